package keysvc_test

import (
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/keygate/keygate/keysvc/api"
)

// session unlocks a fresh VM name and returns its session token.
func (e *env) session(t *testing.T, v *vmTPM, name string) string {
	t.Helper()
	return e.unlocked(t, v, name, setup(t, e, v, name)).Session
}

// listEvents calls GET /v1/admin/events with query q.
func (e *env) listEvents(t *testing.T, q string) []api.EventRecord {
	t.Helper()
	var out []api.EventRecord
	if err := json.Unmarshal(e.admin(t, "GET", "/v1/admin/events?"+q, nil, http.StatusOK), &out); err != nil {
		t.Fatal(err)
	}
	return out
}

func ptr[T any](v T) *T { return &v }

// TestEvents posts monitor events over HTTPS and checks that every
// accepted one is stored, counted and listed, that warning and critical
// ones are audited, and that a bad batch is refused whole.
func TestEvents(t *testing.T) {
	dir := t.TempDir()
	e := startEnv(t, dir)
	v := openVM(t)
	sessA, sessB := e.session(t, v, "ev-a"), e.session(t, v, "ev-b")
	seen := time.Date(2026, 11, 27, 22, 0, 0, 0, time.UTC)
	alert := api.Event{Kind: "ptrace_attach", Severity: "critical", Time: &seen, PID: 4242, Comm: "gdb", Exe: "/usr/bin/gdb",
		UID: ptr(uint32(0)), TargetPID: 17, Addr: 0x7f0000001000, Len: 4096, Overlap: true, OverlapBytes: 4096,
		Result: ptr(int64(-1)), Denied: true, Mode: "deny", Message: "attach refused"}
	post := func(sess string, evs ...api.Event) (int, []byte) {
		return e.vm(t, "POST", "/v1/events", api.EventsRequest{Session: sess, Events: evs})
	}
	for _, b := range []struct {
		sess string
		evs  []api.Event
	}{
		{sessA, []api.Event{{Kind: "heartbeat", Severity: "info"}, alert}},
		{sessB, []api.Event{{Kind: "proc_maps", Severity: "info", PID: 9, TargetPID: 17, Path: "/proc/17/maps", Result: ptr(int64(3))},
			{Kind: "proc_mem", Severity: "warning", PID: 10, Comm: "cat", UID: ptr(uint32(1000)), Mode: "detect"},
			{Kind: "custom.check-1", Severity: "warning", Message: "from a site-local monitor"}}},
	} {
		code, body := post(b.sess, b.evs...)
		if code != http.StatusOK || !strings.Contains(string(body), fmt.Sprintf(`"accepted":%d`, len(b.evs))) {
			t.Fatalf("post events: %d %s", code, body)
		}
	}

	all := e.listEvents(t, "")
	if len(all) != 5 {
		t.Fatalf("%d events stored, want 5", len(all))
	}
	for i := 1; i < len(all); i++ {
		if all[i].ID >= all[i-1].ID {
			t.Fatalf("not newest first: IDs %d then %d", all[i-1].ID, all[i].ID)
		}
	}
	t.Run("stored as sent", func(t *testing.T) {
		got := all[3] // the alert, second of the first batch
		want := alert
		if got.VM != "ev-a" || got.Volume != "ev-a-vol" || got.SessionID == "" || got.Received.IsZero() {
			t.Fatalf("record %+v: wrong vm, volume, session or time", got)
		}
		gb, _ := json.Marshal(got.Event)
		wb, _ := json.Marshal(want)
		if string(gb) != string(wb) {
			t.Fatalf("stored event\n%s\nwant\n%s", gb, wb)
		}
		if strings.Contains(string(e.admin(t, "GET", "/v1/admin/events", nil, http.StatusOK)), sessA) {
			t.Fatal("the listing shows a session token")
		}
	})

	for _, tc := range []struct {
		query string
		kinds []string // newest first
	}{
		{"vm=ev-a", []string{"ptrace_attach", "heartbeat"}},
		{"vm=nobody", nil},
		{"severity=warning", []string{"custom.check-1", "proc_mem", "ptrace_attach"}},
		{"severity=critical", []string{"ptrace_attach"}},
		{"severity=info&vm=ev-b", []string{"custom.check-1", "proc_mem", "proc_maps"}},
		{"kind=proc_maps", []string{"proc_maps"}},
		{"limit=2", []string{"custom.check-1", "proc_mem"}},
		{"since=1h", []string{"custom.check-1", "proc_mem", "proc_maps", "ptrace_attach", "heartbeat"}},
		{"since=" + url.QueryEscape(time.Now().Add(time.Hour).UTC().Format(time.RFC3339)), nil},
	} {
		t.Run("list/"+tc.query, func(t *testing.T) {
			var kinds []string
			for _, r := range e.listEvents(t, tc.query) {
				kinds = append(kinds, r.Kind)
			}
			if strings.Join(kinds, ",") != strings.Join(tc.kinds, ",") {
				t.Fatalf("kinds %v, want %v", kinds, tc.kinds)
			}
		})
	}
	for _, q := range []string{"severity=loud", "limit=0", "limit=1001", "limit=ten", "since=yesterday", "since=-1h"} {
		t.Run("list refused/"+q, func(t *testing.T) {
			e.admin(t, "GET", "/v1/admin/events?"+q, nil, http.StatusBadRequest)
		})
	}
	t.Run("list needs token", func(t *testing.T) {
		if code, _ := e.do(t, "GET", "https://"+e.svc.AdminAddr()+"/v1/admin/events", "", nil); code != http.StatusUnauthorized {
			t.Fatalf("without a token: %d, want 401", code)
		}
	})

	long := strings.Repeat("x", 1025)
	for _, tc := range []struct {
		name string
		body any
		code int
	}{
		{"no kind", api.EventsRequest{Session: sessA, Events: []api.Event{{Severity: "info"}}}, 400},
		{"kind with spaces", api.EventsRequest{Session: sessA, Events: []api.Event{{Kind: "ptrace attach", Severity: "info"}}}, 400},
		{"kind upper case", api.EventsRequest{Session: sessA, Events: []api.Event{{Kind: "Ptrace", Severity: "info"}}}, 400},
		{"kind too long", api.EventsRequest{Session: sessA, Events: []api.Event{{Kind: strings.Repeat("k", 65), Severity: "info"}}}, 400},
		{"bad severity", api.EventsRequest{Session: sessA, Events: []api.Event{{Kind: "k", Severity: "fatal"}}}, 400},
		{"negative pid", api.EventsRequest{Session: sessA, Events: []api.Event{{Kind: "k", Severity: "info", PID: -1}}}, 400},
		{"negative target", api.EventsRequest{Session: sessA, Events: []api.Event{{Kind: "k", Severity: "info", TargetPID: -5}}}, 400},
		{"comm too long", api.EventsRequest{Session: sessA, Events: []api.Event{{Kind: "k", Severity: "info", Comm: long[:65]}}}, 400},
		{"exe too long", api.EventsRequest{Session: sessA, Events: []api.Event{{Kind: "k", Severity: "info", Exe: long}}}, 400},
		{"path too long", api.EventsRequest{Session: sessA, Events: []api.Event{{Kind: "k", Severity: "info", Path: long}}}, 400},
		{"message too long", api.EventsRequest{Session: sessA, Events: []api.Event{{Kind: "k", Severity: "info", Message: long}}}, 400},
		{"bad mode", api.EventsRequest{Session: sessA, Events: []api.Event{{Kind: "k", Severity: "info", Mode: "Deny!"}}}, 400},
		{"overlap bytes without overlap", api.EventsRequest{Session: sessA, Events: []api.Event{{Kind: "k", Severity: "info", OverlapBytes: 1}}}, 400},
		{"time out of range", api.EventsRequest{Session: sessA, Events: []api.Event{{Kind: "k", Severity: "info", Time: &time.Time{}}}}, 400},
		{"good then bad", api.EventsRequest{Session: sessA, Events: []api.Event{{Kind: "k", Severity: "critical"}, {Kind: "k", Severity: "nope"}}}, 400},
		{"unknown field", map[string]any{"session": sessA, "events": []any{map[string]any{"kind": "k", "severity": "info", "pidfd": 3}}}, 400},
		{"uid negative", map[string]any{"session": sessA, "events": []any{map[string]any{"kind": "k", "severity": "info", "uid": -1}}}, 400},
		{"too many", api.EventsRequest{Session: sessA, Events: make([]api.Event, api.MaxEvents+1)}, 413},
		{"too large", api.EventsRequest{Session: sessA, Events: []api.Event{{Kind: "k", Severity: "info", Message: strings.Repeat("y", api.MaxEventsBody)}}}, 413},
		{"forged session", api.EventsRequest{Session: sessA + "x", Events: []api.Event{{Kind: "k", Severity: "critical"}}}, 401},
		{"no session", api.EventsRequest{Events: []api.Event{{Kind: "k", Severity: "critical"}}}, 401},
	} {
		t.Run("refused/"+tc.name, func(t *testing.T) {
			code, body := e.vm(t, "POST", "/v1/events", tc.body)
			if code != tc.code {
				t.Fatalf("%d %s, want %d", code, body, tc.code)
			}
			if n := len(e.listEvents(t, "")); n != len(all) {
				t.Fatalf("%d events stored after a refused batch, want %d", n, len(all))
			}
		})
	}

	t.Run("audited", func(t *testing.T) {
		var recs []struct {
			Actor, Action, Subject string
			Details                map[string]any
		}
		if err := json.Unmarshal(e.admin(t, "GET", "/v1/admin/audit", nil, http.StatusOK), &recs); err != nil {
			t.Fatal(err)
		}
		ids := map[float64]string{}
		for _, r := range recs {
			if r.Action == "alert" {
				id, _ := r.Details["event_id"].(float64)
				ids[id] = r.Details["kind"].(string)
			}
		}
		want := map[float64]string{}
		for _, ev := range all {
			if ev.Severity != "info" {
				want[float64(ev.ID)] = ev.Kind
			}
		}
		if fmt.Sprint(ids) != fmt.Sprint(want) {
			t.Fatalf("alert records name events %v, want the warning and critical ones %v", ids, want)
		}
	})

	t.Run("metrics", func(t *testing.T) {
		_, body := e.do(t, "GET", "https://"+e.svc.AdminAddr()+"/metrics", "", nil)
		for _, want := range []string{
			`keysvc_vm_events_total{kind="heartbeat",severity="info"} 1`,
			`keysvc_vm_events_total{kind="ptrace_attach",severity="critical"} 1`,
			`keysvc_vm_events_total{kind="proc_mem",severity="warning"} 1`,
			`keysvc_vm_events_total{kind="other",severity="warning"} 1`,
		} {
			if !strings.Contains(string(body), want) {
				t.Errorf("metrics lack %s", want)
			}
		}
	})

	t.Run("kept across restart", func(t *testing.T) {
		e.stop(t)
		e2 := startEnv(t, dir)
		if got := e2.listEvents(t, "severity=critical"); len(got) != 1 || got[0].ID != all[3].ID || got[0].Comm != "gdb" {
			t.Fatalf("after restart: %+v", got)
		}
	})
}
