package keysvc_test

import (
	"bytes"
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"net/http"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/keygate/keygate/keysvc"
	"github.com/keygate/keygate/keysvc/api"
	"github.com/keygate/keygate/keysvc/audit"
	"github.com/keygate/keygate/keysvc/store"
)

// breakAuditTail edits the last audit record of the stopped service in dir,
// as someone with write access to the database would, so that Append
// refuses to extend the chain.
func breakAuditTail(t *testing.T, dir string) {
	t.Helper()
	db, err := sql.Open("sqlite", filepath.Join(dir, store.DBFile))
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	for _, q := range []string{
		"DROP TRIGGER audit_log_no_update",
		"UPDATE audit_log SET actor = 'evil' WHERE seq = (SELECT max(seq) FROM audit_log)",
	} {
		if _, err := db.Exec(q); err != nil {
			t.Fatalf("%s: %v", q, err)
		}
	}
}

// TestAdminChangesFailClosed: with an audit chain that cannot be extended,
// every admin call that changes state answers 500 (naming `keysvc audit
// verify`) and changes nothing; reads still answer.
func TestAdminChangesFailClosed(t *testing.T) {
	dir := t.TempDir()
	e := startEnv(t, dir)
	ak := randomPEM(t)
	e.admin(t, "POST", "/v1/admin/vms", api.EnrollRequest{Name: "a", EKPub: randomPEM(t), AKPub: ak}, http.StatusCreated)
	e.admin(t, "POST", "/v1/admin/volumes", api.VolumeRequest{ID: "a-vol", VM: "a"}, http.StatusCreated)
	e.stop(t)
	breakAuditTail(t, dir)
	e = startEnv(t, dir)

	pol := map[string]any{"pcrs": map[string][]string{"7": {strings.Repeat("ab", 32)}}}
	for _, tc := range []struct {
		name, method, path string
		body               any
	}{
		{"enroll", "POST", "/v1/admin/vms", api.EnrollRequest{Name: "b", EKPub: randomPEM(t)}},
		{"set-ak", "PUT", "/v1/admin/vms/a/ak", api.SetAKRequest{AKPub: randomPEM(t)}},
		{"revoke", "POST", "/v1/admin/vms/a/revoke", nil},
		{"policy-set", "PUT", "/v1/admin/vms/a/policy", pol},
		{"policy-learn", "POST", "/v1/admin/vms/a/policy/learn", nil},
		{"volume-create", "POST", "/v1/admin/volumes", api.VolumeRequest{ID: "new-vol", VM: "a"}},
		{"volume-import", "POST", "/v1/admin/volumes", api.VolumeRequest{ID: "imp-vol", VM: "a", Key: ukBytes}},
		{"erase", "POST", "/v1/admin/volumes/a-vol/erase", nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := e.admin(t, tc.method, tc.path, tc.body, http.StatusInternalServerError)
			var eb api.ErrorBody
			if err := json.Unmarshal(b, &eb); err != nil || !strings.Contains(eb.Hint, "keysvc audit verify") {
				t.Fatalf("answer %s: want a hint to run `keysvc audit verify`", b)
			}
		})
	}

	var vm api.VMInfo
	json.Unmarshal(e.admin(t, "GET", "/v1/admin/vms/a", nil, http.StatusOK), &vm)
	if vm.Revoked || vm.LearnArmed || vm.AKPub != ak || string(vm.Policy) != "{}" {
		t.Fatalf("vm changed without an audit record: %+v", vm)
	}
	var vol api.VolumeInfo
	json.Unmarshal(e.admin(t, "GET", "/v1/admin/volumes/a-vol", nil, http.StatusOK), &vol)
	if vol.Erased {
		t.Fatal("volume erased without an audit record")
	}
	e.admin(t, "GET", "/v1/admin/vms/b", nil, http.StatusNotFound)
	e.admin(t, "GET", "/v1/admin/volumes/new-vol", nil, http.StatusNotFound)
	e.admin(t, "GET", "/v1/admin/volumes/imp-vol", nil, http.StatusNotFound)
}

// TestAdminChangeRecordedBeforeOutcome: a change's action record comes
// before the call's outcome record, and a call refused for a missing target
// writes no action record.
func TestAdminChangeRecordedBeforeOutcome(t *testing.T) {
	e := startEnv(t, t.TempDir())
	e.admin(t, "POST", "/v1/admin/vms", api.EnrollRequest{Name: "a", EKPub: randomPEM(t)}, http.StatusCreated)
	e.admin(t, "POST", "/v1/admin/vms/a/revoke", nil, http.StatusOK)
	e.admin(t, "POST", "/v1/admin/vms/ghost/revoke", nil, http.StatusNotFound)
	e.admin(t, "POST", "/v1/admin/volumes/ghost/erase", nil, http.StatusNotFound)
	var recs []audit.Record
	json.Unmarshal(e.admin(t, "GET", "/v1/admin/audit", nil, http.StatusOK), &recs)
	var seq []string
	for _, r := range recs {
		seq = append(seq, string(r.Action)+" "+r.Subject)
	}
	got := strings.Join(seq, "\n")
	// A new store starts with its genesis record (adopt.go).
	want := "genesis store\nenroll a\nadmin /v1/admin/vms\nrevoke a\nadmin /v1/admin/vms/a/revoke\nadmin /v1/admin/vms/ghost/revoke\nadmin /v1/admin/volumes/ghost/erase"
	if got != want {
		t.Fatalf("audit records:\n%s\nwant:\n%s", got, want)
	}
}

// TestUnauthenticatedAdminAuditedBeforeLimit: a request without a token is
// answered 401 (never 429) and audited, with its path cut to a bound; past
// the per-source rate, requests are summarised in one record instead.
func TestUnauthenticatedAdminAuditedBeforeLimit(t *testing.T) {
	e := startEnv(t, t.TempDir(), keysvc.WithRateLimits(1, 0)) // burst 2 per source
	long := "/v1/admin/" + strings.Repeat("x", 8000)
	for i := range 10 {
		code, b := e.do(t, "GET", "https://"+e.svc.AdminAddr()+long, "", nil)
		if code != http.StatusUnauthorized {
			t.Fatalf("request %d without a token: %d %s, want 401", i, code, b)
		}
	}
	time.Sleep(1100 * time.Millisecond) // one more record allowed
	if code, _ := e.do(t, "GET", "https://"+e.svc.AdminAddr()+"/v1/admin/vms", "wrong", nil); code != http.StatusUnauthorized {
		t.Fatalf("wrong token: %d", code)
	}
	var recs []audit.Record
	json.Unmarshal(e.admin(t, "GET", "/v1/admin/audit", nil, http.StatusOK), &recs)
	var anon []audit.Record
	for _, r := range recs {
		if r.Actor == "anonymous" {
			anon = append(anon, r)
		}
		if len(r.Subject) > 300 || len(r.Details) > 600 {
			t.Errorf("record %d is %d+%d bytes: path not truncated", r.Seq, len(r.Subject), len(r.Details))
		}
	}
	// The burst (2) one by one, a summary of the rest, then the last; all
	// 11 accounted for (a slow machine may refill a token in between).
	one, summarised, summaries := 0, 0, 0
	for _, r := range anon {
		if n, ok := summaryCount(r.Subject); ok {
			summarised += n
			summaries++
		} else {
			one++
		}
	}
	if summaries == 0 || one+summarised != 11 || anon[len(anon)-1].Subject != "/v1/admin/vms" {
		for _, r := range anon {
			t.Logf("%d %s %s", r.Seq, r.Subject, r.Details)
		}
		t.Fatalf("%d records one by one and %d summaries of %d, want 11 requests in all and a summary", one, summaries, summarised)
	}
	var d audit.Admin
	if err := json.Unmarshal(anon[0].Details, &d); err != nil || d.Status != http.StatusUnauthorized || d.Remote == "" {
		t.Fatalf("record of a 401: %s", anon[0].Details)
	}
}

// TestUnauthenticatedSummaryOnShutdown: requests suppressed from the audit
// chain are summarised when the service stops, even if no later request
// came.
func TestUnauthenticatedSummaryOnShutdown(t *testing.T) {
	dir := t.TempDir()
	e := startEnv(t, dir, keysvc.WithRateLimits(1, 0))
	for range 5 {
		e.do(t, "GET", "https://"+e.svc.AdminAddr()+"/v1/admin/vms", "", nil)
	}
	e.stop(t)
	e = startEnv(t, dir)
	var recs []audit.Record
	json.Unmarshal(e.admin(t, "GET", "/v1/admin/audit", nil, http.StatusOK), &recs)
	one, summarised := 0, 0
	for _, r := range recs {
		if n, ok := summaryCount(r.Subject); ok {
			summarised += n
		} else if r.Actor == "anonymous" {
			one++
		}
	}
	if summarised == 0 || one+summarised != 5 {
		t.Fatalf("%d records one by one and %d requests summarised, want 5 in all and a summary", one, summarised)
	}
}

// summaryCount parses the count of a summary record's subject.
func summaryCount(subject string) (int, bool) {
	n, rest, ok := strings.Cut(subject, " ")
	if !ok || !strings.HasPrefix(rest, "more unauthenticated requests") {
		return 0, false
	}
	c, err := strconv.Atoi(n)
	return c, err == nil
}

// TestSourceRateLimitOverHTTP: a tiny per-source budget answers 429 on the
// VM API and, for authenticated calls, on the admin API.
func TestSourceRateLimitOverHTTP(t *testing.T) {
	e := startEnv(t, t.TempDir(), keysvc.WithRateLimits(1, 0)) // burst 2 per source, no per-VM limit
	for _, tc := range []struct {
		name string
		send func(i int) int
		want []int
	}{
		{"vm-api", func(i int) int {
			// Different VM names: only the per-source limit can refuse.
			code, _ := e.vm(t, "POST", "/v1/challenge", api.ChallengeRequest{VM: "vm" + string(rune('a'+i)), Volume: "v", EKPub: randomPEM(t), AKPub: randomPEM(t)})
			return code
		}, []int{http.StatusForbidden, http.StatusForbidden, http.StatusTooManyRequests}},
		{"admin-api", func(int) int {
			code, _ := e.do(t, "GET", "https://"+e.svc.AdminAddr()+"/v1/admin/vms", e.token, nil)
			return code
		}, []int{http.StatusOK, http.StatusOK, http.StatusTooManyRequests}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var got []int
			for i := range len(tc.want) {
				got = append(got, tc.send(i))
			}
			for i := range got {
				if got[i] != tc.want[i] {
					t.Fatalf("codes %v, want %v", got, tc.want)
				}
			}
		})
	}
}

// TestChallengeBeforeRevoke: a challenge issued before the VM was revoked
// does not unlock after it.
func TestChallengeBeforeRevoke(t *testing.T) {
	e := startEnv(t, t.TempDir())
	v := openVM(t)
	vol := setup(t, e, v, "late")
	ch := e.challenge(t, v, "late", vol)
	att := v.quote(t, ch.Nonce)
	e.admin(t, "POST", "/v1/admin/vms/late/revoke", nil, http.StatusOK)
	code, body := e.vm(t, "POST", "/v1/unlock", api.UnlockRequest{Challenge: ch.Challenge, Attestation: att})
	wantRefusal(t, code, body, api.ReasonRevoked)
}

// gateAuditor is an in-memory audit log whose enroll appends wait for gate:
// it makes an admin handler that is still running at shutdown.
type gateAuditor struct {
	memAudit
	entered chan struct{}
	gate    chan struct{}
}

func (a *gateAuditor) Append(ctx context.Context, ev audit.Event) (audit.Record, error) {
	if ev.Action == audit.ActionEnroll {
		close(a.entered)
		<-a.gate
	}
	return a.memAudit.Append(ctx, ev)
}

// TestShutdownWaitsForHandlers: when Shutdown's deadline passes with a
// handler still running, that request finishes (the store stays open for
// it) and its change lands; the store is closed after it.
func TestShutdownWaitsForHandlers(t *testing.T) {
	dir := t.TempDir()
	ga := &gateAuditor{entered: make(chan struct{}), gate: make(chan struct{})}
	e := startEnv(t, dir, keysvc.WithAudit(ga))
	body, _ := json.Marshal(api.EnrollRequest{Name: "slow", EKPub: randomPEM(t)})
	answer := make(chan int, 1)
	go func() {
		req, _ := http.NewRequest("POST", "https://"+e.svc.AdminAddr()+"/v1/admin/vms", bytes.NewReader(body))
		req.Header.Set("Authorization", "Bearer "+e.token)
		resp, err := e.client.Do(req)
		if err != nil {
			answer <- 0
			return
		}
		resp.Body.Close()
		answer <- resp.StatusCode
	}()
	select {
	case <-ga.entered:
	case <-time.After(10 * time.Second):
		t.Fatal("enroll did not reach the audit log")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	if err := e.svc.Shutdown(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("shutdown with a running handler: %v", err)
	}
	close(ga.gate)
	select {
	case code := <-answer:
		if code != http.StatusCreated {
			t.Fatalf("the running enroll answered %d, want 201", code)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the running enroll never answered")
	}
	db, err := sql.Open("sqlite", filepath.Join(dir, store.DBFile))
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		var n int
		if err := db.QueryRow("SELECT count(*) FROM vms WHERE name = 'slow'").Scan(&n); err == nil && n == 1 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatal("the running enroll did not land: the store was closed under it")
		}
	}
}
