package keysvc_test

import (
	"crypto/x509"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/keygate/keygate/keysvc"
	"github.com/keygate/keygate/keysvc/api"
	"github.com/keygate/keygate/keysvc/audit"
)

// servingVM unlocks vol as a booting VM does, closing the window with the
// unlock-done extend, and returns the session.
func (e *env) servingVM(t *testing.T, v *vmTPM, name, vol string) string {
	t.Helper()
	r := e.unlockBoth(t, v, name, vol)
	if err := v.tpm.Extend(keysvc.WindowPCR, api.UnlockDoneEvent(vol)); err != nil {
		t.Fatal(err)
	}
	return r.session
}

// reattest runs one re-attestation of the session with the VM's current
// PCRs.
func (e *env) reattest(t *testing.T, v *vmTPM, session string, interval int64) (int, api.ReattestResponse, []byte) {
	t.Helper()
	base := "https://" + e.svc.VMAddr()
	code, b := e.do(t, "POST", base+"/v1/reattest/challenge", session, nil)
	if code != http.StatusOK {
		return code, api.ReattestResponse{}, b
	}
	var ch api.ReattestChallengeResponse
	if err := json.Unmarshal(b, &ch); err != nil {
		t.Fatal(err)
	}
	code, b = e.do(t, "POST", base+"/v1/reattest", session, api.ReattestRequest{Challenge: ch.Challenge, Attestation: v.quote(t, ch.Nonce), IntervalSeconds: interval})
	var rr api.ReattestResponse
	json.Unmarshal(b, &rr)
	return code, rr, b
}

// TestReattest: a serving VM whose PCRs still match (with the window PCR at
// its one-unlock value) stays active; a PCR extended after the unlock, or
// a window PCR never closed, is answered "lock", audited and stored as a
// critical event.
func TestReattest(t *testing.T) {
	tests := []struct {
		name      string
		after     func(t *testing.T, v *vmTPM) // between the unlock and the re-attestation
		skipClose bool                         // do not extend the window PCR after the unlock
		want      string
		wantPCR   int
	}{
		{name: "unchanged", want: api.StateActive},
		{name: "boot-pcr-extended", after: func(t *testing.T, v *vmTPM) { v.tpm.Extend(7, []byte("a runtime measurement")) }, want: api.StateLock, wantPCR: 7},
		{name: "window-extended-again", after: func(t *testing.T, v *vmTPM) { v.tpm.Extend(keysvc.WindowPCR, []byte("something later")) }, want: api.StateLock, wantPCR: keysvc.WindowPCR},
		{name: "window-never-closed", skipClose: true, want: api.StateLock, wantPCR: keysvc.WindowPCR},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := startEnv(t, t.TempDir())
			v := openVM(t)
			if err := v.tpm.Reboot(); err != nil {
				t.Fatal(err)
			}
			vol := setup(t, e, v, "ra")
			var session string
			if tt.skipClose {
				session = e.unlockBoth(t, v, "ra", vol).session
			} else {
				session = e.servingVM(t, v, "ra", vol)
			}
			if tt.after != nil {
				tt.after(t, v)
			}
			code, rr, body := e.reattest(t, v, session, 300)
			if code != http.StatusOK || rr.State != tt.want {
				t.Fatalf("reattest: %d %s, want state %s", code, body, tt.want)
			}
			recs := e.auditOf(t, audit.ActionReattest)
			failed := e.listEvents(t, "kind=reattest-failed")
			if tt.want == api.StateActive {
				if len(recs) != 0 || len(failed) != 0 {
					t.Fatalf("a good re-attestation left %d audit records and %d events", len(recs), len(failed))
				}
				return
			}
			if rr.Denial == nil || len(rr.Denial.Mismatches) != 1 || rr.Denial.Mismatches[0].PCR != tt.wantPCR {
				t.Fatalf("denial %+v, want PCR %d named", rr.Denial, tt.wantPCR)
			}
			var d audit.Reattest
			if len(recs) != 1 || json.Unmarshal(recs[0].Details, &d) != nil || d.Result != api.StateLock || d.SessionID == "" || len(d.Mismatches) != 1 || d.Mismatches[0].PCR != tt.wantPCR {
				t.Fatalf("audit records %+v, want one lock naming PCR %d", recs, tt.wantPCR)
			}
			if len(failed) != 1 || failed[0].Severity != "critical" || failed[0].VM != "ra" {
				t.Fatalf("events %+v, want one critical reattest-failed", failed)
			}
			// The lock holds even if the VM ignores it: its heartbeat
			// reads revoked, and it gets no new re-attestation.
			code, body = e.do(t, "GET", "https://"+e.svc.VMAddr()+"/v1/session", session, nil)
			var st api.SessionResponse
			if code != http.StatusOK || json.Unmarshal(body, &st) != nil || st.State != api.StateRevoked {
				t.Fatalf("session after the lock: %d %s, want revoked", code, body)
			}
			code, body = e.do(t, "POST", "https://"+e.svc.VMAddr()+"/v1/reattest/challenge", session, struct{}{})
			var again api.ReattestResponse
			if code != http.StatusOK || json.Unmarshal(body, &again) != nil || again.State != api.StateLock {
				t.Fatalf("re-attestation challenge after the lock: %d %s, want lock", code, body)
			}
		})
	}
}

// TestReattestRefusals: the re-attestation endpoints take only a live
// session, a challenge of their own, used once, and a sane interval.
func TestReattestRefusals(t *testing.T) {
	e := startEnv(t, t.TempDir())
	v := openVM(t)
	if err := v.tpm.Reboot(); err != nil {
		t.Fatal(err)
	}
	vol := setup(t, e, v, "rf")
	session := e.servingVM(t, v, "rf", vol)
	base := "https://" + e.svc.VMAddr()
	challenge := func() api.ReattestChallengeResponse {
		code, b := e.do(t, "POST", base+"/v1/reattest/challenge", session, nil)
		if code != http.StatusOK {
			t.Fatalf("challenge: %d %s", code, b)
		}
		var ch api.ReattestChallengeResponse
		json.Unmarshal(b, &ch)
		return ch
	}
	used := challenge()
	if code, b := e.do(t, "POST", base+"/v1/reattest", session, api.ReattestRequest{Challenge: used.Challenge, Attestation: v.quote(t, used.Nonce), IntervalSeconds: 60}); code != http.StatusOK {
		t.Fatalf("first use: %d %s", code, b)
	}
	unlockCh := e.challenge(t, v, "rf", vol)
	for _, tc := range []struct {
		name    string
		session string
		req     func() api.ReattestRequest
		want    int
		reason  string
	}{
		{"no-session", "", func() api.ReattestRequest {
			ch := challenge()
			return api.ReattestRequest{Challenge: ch.Challenge, Attestation: v.quote(t, ch.Nonce), IntervalSeconds: 60}
		}, http.StatusUnauthorized, ""},
		{"forged-session", session[:len(session)-2] + "AA", func() api.ReattestRequest {
			ch := challenge()
			return api.ReattestRequest{Challenge: ch.Challenge, Attestation: v.quote(t, ch.Nonce), IntervalSeconds: 60}
		}, http.StatusUnauthorized, ""},
		{"replayed-challenge", session, func() api.ReattestRequest {
			return api.ReattestRequest{Challenge: used.Challenge, Attestation: v.quote(t, used.Nonce), IntervalSeconds: 60}
		}, http.StatusForbidden, api.ReasonChallenge},
		{"unlock-challenge", session, func() api.ReattestRequest {
			return api.ReattestRequest{Challenge: unlockCh.Challenge, Attestation: v.quote(t, unlockCh.Nonce), IntervalSeconds: 60}
		}, http.StatusForbidden, api.ReasonChallenge},
		{"quote-over-other-nonce", session, func() api.ReattestRequest {
			ch := challenge()
			return api.ReattestRequest{Challenge: ch.Challenge, Attestation: v.quote(t, unlockCh.Nonce), IntervalSeconds: 60}
		}, http.StatusForbidden, api.ReasonEvidence},
		{"zero-interval", session, func() api.ReattestRequest {
			ch := challenge()
			return api.ReattestRequest{Challenge: ch.Challenge, Attestation: v.quote(t, ch.Nonce), IntervalSeconds: 0}
		}, http.StatusBadRequest, ""},
		{"not-a-quote", session, func() api.ReattestRequest {
			ch := challenge()
			return api.ReattestRequest{Challenge: ch.Challenge, Attestation: []byte("junk"), IntervalSeconds: 60}
		}, http.StatusForbidden, api.ReasonEvidence},
	} {
		t.Run(tc.name, func(t *testing.T) {
			code, b := e.do(t, "POST", base+"/v1/reattest", tc.session, tc.req())
			if code != tc.want {
				t.Fatalf("%d %s, want %d", code, b, tc.want)
			}
			if tc.reason != "" {
				wantRefusal(t, code, b, tc.reason)
			}
		})
	}
	t.Run("revoked", func(t *testing.T) {
		ch := challenge()
		e.admin(t, "POST", "/v1/admin/vms/rf/revoke", nil, http.StatusOK)
		code, b := e.do(t, "POST", base+"/v1/reattest", session, api.ReattestRequest{Challenge: ch.Challenge, Attestation: v.quote(t, ch.Nonce), IntervalSeconds: 60})
		var rr api.ReattestResponse
		if json.Unmarshal(b, &rr); code != http.StatusOK || rr.State != api.StateRevoked {
			t.Fatalf("reattest: %d %s, want state revoked", code, b)
		}
		code, b = e.do(t, "POST", base+"/v1/reattest/challenge", session, nil)
		wantRefusal(t, code, b, api.ReasonRevoked)
	})
}

// TestReattestStale: a session whose re-attestations stop is flagged once
// (event, audit record, gauge) after twice its interval and the grace, and
// unflagged when it re-attests again.
func TestReattestStale(t *testing.T) {
	e := startEnv(t, t.TempDir())
	v := openVM(t)
	if err := v.tpm.Reboot(); err != nil {
		t.Fatal(err)
	}
	vol := setup(t, e, v, "st")
	session := e.servingVM(t, v, "st", vol)
	if code, rr, b := e.reattest(t, v, session, 10); code != http.StatusOK || rr.State != api.StateActive {
		t.Fatalf("reattest: %d %s", code, b)
	}
	srv := e.svc.Server
	e.clock.Add(20 * time.Second)
	if n := srv.CheckStale(t.Context()); n != 0 {
		t.Fatalf("flagged %d sessions at twice the interval, before the grace", n)
	}
	e.clock.Add(keysvc.StaleGrace + time.Second)
	if n := srv.CheckStale(t.Context()); n != 1 {
		t.Fatalf("flagged %d sessions past twice the interval and the grace, want 1", n)
	}
	if n := srv.CheckStale(t.Context()); n != 0 {
		t.Fatalf("flagged the same session again (%d)", n)
	}
	if g := e.gauge(t, "keysvc_reattest_stale_sessions"); g != "1" {
		t.Fatalf("stale gauge %q, want 1", g)
	}
	if evs := e.listEvents(t, "kind=reattest-stale"); len(evs) != 1 || evs[0].Severity != "critical" {
		t.Fatalf("stale events %+v, want one critical", evs)
	}
	if recs := e.auditOf(t, audit.ActionReattest); len(recs) != 1 || !strings.Contains(string(recs[0].Details), `"stale"`) {
		t.Fatalf("audit records %+v, want one stale", recs)
	}
	// The challenge TTL runs on the same clock: challenges issued now are
	// fresh.
	if code, rr, b := e.reattest(t, v, session, 10); code != http.StatusOK || rr.State != api.StateActive {
		t.Fatalf("reattest after stale: %d %s", code, b)
	}
	if g := e.gauge(t, "keysvc_reattest_stale_sessions"); g != "0" {
		t.Fatalf("stale gauge %q after the session came back, want 0", g)
	}
	if evs := e.listEvents(t, "kind=reattest-resumed"); len(evs) != 1 {
		t.Fatalf("resumed events %+v, want one", evs)
	}
	// A VM told to lock is not waited for.
	v.tpm.Extend(7, []byte("late"))
	if _, rr, _ := e.reattest(t, v, session, 10); rr.State != api.StateLock {
		t.Fatalf("state %q, want lock", rr.State)
	}
	e.clock.Add(time.Hour)
	if n := srv.CheckStale(t.Context()); n != 0 {
		t.Fatalf("a locked session was flagged stale (%d)", n)
	}
}

// gauge reads one unlabelled metric's value from /metrics.
func (e *env) gauge(t *testing.T, name string) string {
	t.Helper()
	code, b := e.do(t, "GET", "https://"+e.svc.AdminAddr()+"/metrics", "", nil)
	if code != http.StatusOK {
		t.Fatalf("metrics: %d", code)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, name+" "); ok {
			return v
		}
	}
	t.Fatalf("no %s in /metrics", name)
	return ""
}

// TestReattestLockAlert: a failed re-attestation reaches the operator's
// webhook as a critical alert, as a VM's own critical events do.
func TestReattestLockAlert(t *testing.T) {
	bodies := make(chan []byte, 8)
	srv := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		bodies <- b
	}))
	defer srv.Close()
	pool := x509.NewCertPool()
	pool.AddCert(srv.Certificate())
	cfg := keysvc.AlertConfig{Webhooks: []string{srv.URL + "/hook"}, WebhookSecret: []byte("0123456789abcdef0123456789abcdef"), CAs: pool}
	e := startEnvFunc(t, t.TempDir(), func(c *keysvc.Config) { c.Alerts = cfg })
	v := openVM(t)
	if err := v.tpm.Reboot(); err != nil {
		t.Fatal(err)
	}
	vol := setup(t, e, v, "al")
	session := e.servingVM(t, v, "al", vol)
	v.tpm.Extend(7, []byte("a runtime measurement"))
	if _, rr, b := e.reattest(t, v, session, 60); rr.State != api.StateLock {
		t.Fatalf("reattest: %s, want lock", b)
	}
	select {
	case b := <-bodies:
		var ab keysvc.AlertBody
		if err := json.Unmarshal(b, &ab); err != nil || ab.Event.Kind != "reattest-failed" || ab.Event.Severity != "critical" || ab.Event.VM != "al" {
			t.Fatalf("alert %s (%v), want a critical reattest-failed of vm al", b, err)
		}
	case <-time.After(60 * time.Second):
		t.Fatal("no alert within 60s")
	}
}
