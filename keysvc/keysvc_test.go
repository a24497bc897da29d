package keysvc_test

import (
	"bytes"
	"crypto/sha256"
	"crypto/tls"
	"database/sql"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	pb "github.com/google/go-tpm-tools/proto/attest"
	"google.golang.org/protobuf/proto"

	"github.com/keygate/keygate/keysvc"
	"github.com/keygate/keygate/keysvc/api"
	"github.com/keygate/keygate/keysvc/store"
	"github.com/keygate/keygate/tpm"
)

var ukBytes = bytes.Repeat([]byte{0x5a}, 32)

// setup enrolls the VM as name with its EK and AK, imports volume name+"-vol"
// with ukBytes, and sets a policy on PCRs 0 and 7.
func setup(t testing.TB, e *env, v *vmTPM, name string) string {
	t.Helper()
	e.admin(t, "POST", "/v1/admin/vms", api.EnrollRequest{Name: name, EKPub: v.ekPEM, AKPub: v.akPEM}, http.StatusCreated)
	e.admin(t, "POST", "/v1/admin/volumes", api.VolumeRequest{ID: name + "-vol", VM: name, Key: ukBytes}, http.StatusCreated)
	e.admin(t, "PUT", "/v1/admin/vms/"+name+"/policy", v.pcrPolicy(t, 0, 7), http.StatusOK)
	v.ca = e.ca
	return name + "-vol"
}

func TestUnlockOverHTTPS(t *testing.T) {
	e := startEnv(t, t.TempDir())
	v := openVM(t)

	t.Run("happy", func(t *testing.T) {
		vol := setup(t, e, v, "happy")
		code, body := e.unlock(t, v, "happy", vol)
		if code != http.StatusOK {
			t.Fatalf("unlock: %d %s", code, body)
		}
		uk, err := v.importBlob(t, body, tpm.ECC)
		if err != nil {
			t.Fatalf("import: %v", err)
		}
		if !bytes.Equal(uk, ukBytes) {
			t.Fatal("imported UK differs from the imported key file")
		}
		var ur api.UnlockResponse
		json.Unmarshal(body, &ur)
		code, body = e.do(t, "GET", "https://"+e.svc.VMAddr()+"/v1/session", ur.Session, nil)
		if code != http.StatusOK || !strings.Contains(string(body), `"active"`) {
			t.Fatalf("session: %d %s", code, body)
		}
		// The blob is sealed to this TPM's ECC EK: the RSA EK (another
		// key, as another TPM's would be) cannot import it.
		if _, err := v.importBlob(t, body0(t, e, v, "happy", vol), tpm.RSA); !errors.Is(err, tpm.ErrWrongTPM) {
			t.Fatalf("import with another EK: %v, want ErrWrongTPM", err)
		}
	})

	t.Run("created-volume", func(t *testing.T) {
		setup(t, e, v, "created")
		e.admin(t, "POST", "/v1/admin/volumes", api.VolumeRequest{ID: "made", VM: "created"}, http.StatusCreated)
		code, body := e.unlock(t, v, "created", "made")
		if code != http.StatusOK {
			t.Fatalf("unlock: %d %s", code, body)
		}
		uk, err := v.importBlob(t, body, tpm.ECC)
		if err != nil || len(uk) != api.UKSize {
			t.Fatalf("import: %d bytes, %v", len(uk), err)
		}
	})

	t.Run("wrong-nonce", func(t *testing.T) {
		vol := setup(t, e, v, "nonce")
		ch := e.challenge(t, v, "nonce", vol)
		code, body := e.vm(t, "POST", "/v1/unlock", api.UnlockRequest{Challenge: ch.Challenge, Attestation: v.quote(t, bytes.Repeat([]byte{1}, 32))})
		wantRefusal(t, code, body, api.ReasonEvidence)
	})

	t.Run("quote-names-another-ca", func(t *testing.T) {
		// The VM's quote is genuine and fresh, but it binds the CA of a
		// relay it was made to pin (an edited keygate token), not ours.
		vol := setup(t, e, v, "relayed")
		ch := e.challenge(t, v, "relayed", vol)
		ours := v.ca
		v.ca = sha256.Sum256([]byte("a relay's CA"))
		att := v.quote(t, ch.Nonce)
		v.ca = ours
		code, body := e.vm(t, "POST", "/v1/unlock", api.UnlockRequest{Challenge: ch.Challenge, Attestation: att})
		wantRefusal(t, code, body, api.ReasonEvidence)
	})

	t.Run("replayed-challenge", func(t *testing.T) {
		vol := setup(t, e, v, "replay")
		ch := e.challenge(t, v, "replay", vol)
		req := api.UnlockRequest{Challenge: ch.Challenge, Attestation: v.quote(t, ch.Nonce)}
		if code, body := e.vm(t, "POST", "/v1/unlock", req); code != http.StatusOK {
			t.Fatalf("first unlock: %d %s", code, body)
		}
		code, body := e.vm(t, "POST", "/v1/unlock", req)
		wantReplay(t, code, body)
	})

	t.Run("refused-attempt-uses-challenge", func(t *testing.T) {
		// The refusal's record and the challenge's use are one write: the
		// challenge of a refused attempt cannot be tried again.
		vol := setup(t, e, v, "burnt")
		ch := e.challenge(t, v, "burnt", vol)
		code, body := e.vm(t, "POST", "/v1/unlock", api.UnlockRequest{Challenge: ch.Challenge, Attestation: v.quote(t, bytes.Repeat([]byte{2}, 32))})
		wantRefusal(t, code, body, api.ReasonEvidence)
		code, body = e.vm(t, "POST", "/v1/unlock", api.UnlockRequest{Challenge: ch.Challenge, Attestation: v.quote(t, ch.Nonce)})
		wantReplay(t, code, body)
	})

	t.Run("expired-challenge", func(t *testing.T) {
		vol := setup(t, e, v, "expired")
		ch := e.challenge(t, v, "expired", vol)
		att := v.quote(t, ch.Nonce)
		e.clock.Add(2 * time.Minute)
		defer e.clock.Add(-2 * time.Minute)
		code, body := e.vm(t, "POST", "/v1/unlock", api.UnlockRequest{Challenge: ch.Challenge, Attestation: att})
		m := wantRefusal(t, code, body, api.ReasonChallenge)
		if !strings.Contains(m["hint"].(string), "expired") {
			t.Fatalf("hint %q does not say expired", m["hint"])
		}
	})

	t.Run("pcr-mismatch", func(t *testing.T) {
		vol := setup(t, e, v, "mismatch")
		// Allow some other value of PCR 7 only.
		e.admin(t, "PUT", "/v1/admin/vms/mismatch/policy", map[string]any{"pcrs": map[string][]string{"7": {strings.Repeat("ab", 32)}}}, http.StatusOK)
		code, body := e.unlock(t, v, "mismatch", vol)
		if code != http.StatusForbidden {
			t.Fatalf("unlock: %d %s", code, body)
		}
		var d struct {
			Reason     string
			Mismatches []struct {
				PCR     int
				Allowed []string
				Got     string
			}
		}
		if err := json.Unmarshal(body, &d); err != nil {
			t.Fatal(err)
		}
		if len(d.Mismatches) != 1 || d.Mismatches[0].PCR != 7 || d.Mismatches[0].Got == "" || d.Mismatches[0].Allowed[0] != strings.Repeat("ab", 32) || !strings.Contains(d.Reason, "PCR 7") {
			t.Fatalf("diagnostics do not name PCR 7: %s", body)
		}
	})

	t.Run("learn", func(t *testing.T) {
		vol := setup(t, e, v, "learner")
		e.admin(t, "PUT", "/v1/admin/vms/learner/policy", map[string]any{"pcrs": map[string][]string{"7": {strings.Repeat("ab", 32)}}}, http.StatusOK)
		e.admin(t, "POST", "/v1/admin/vms/learner/policy/learn", nil, http.StatusOK)
		if code, body := e.unlock(t, v, "learner", vol); code != http.StatusOK {
			t.Fatalf("learning unlock: %d %s", code, body)
		}
		var pol struct{ PCRs map[string][]string }
		json.Unmarshal(e.admin(t, "GET", "/v1/admin/vms/learner/policy", nil, http.StatusOK), &pol)
		if len(pol.PCRs["7"]) != 1 || pol.PCRs["7"][0] == strings.Repeat("ab", 32) || len(pol.PCRs) < 2 {
			t.Fatalf("learned policy: %+v", pol)
		}
		if got := pol.PCRs[strconv.Itoa(keysvc.WindowPCR)]; len(got) != 1 || got[0] != strings.Repeat("00", 32) {
			t.Fatalf("learned policy holds PCR %d = %v, want its reset value, so a second unlock in one boot fails", keysvc.WindowPCR, got)
		}
		// Disarmed: the next unlock is checked against the learned policy.
		if code, body := e.unlock(t, v, "learner", vol); code != http.StatusOK {
			t.Fatalf("unlock after learning: %d %s", code, body)
		}

		// The VM closes the window after its unlock, as keygate boot does:
		// a second unlock in the same boot is a policy denial naming the PCR.
		if err := v.tpm.Extend(keysvc.WindowPCR, []byte("unlock done")); err != nil {
			t.Fatal(err)
		}
		defer func() {
			if err := v.tpm.Reboot(); err != nil {
				t.Fatal(err)
			}
		}()
		code, body := e.unlock(t, v, "learner", vol)
		if code != http.StatusForbidden || !strings.Contains(string(body), fmt.Sprintf(`"pcr":%d`, keysvc.WindowPCR)) {
			t.Fatalf("second unlock in one boot: %d %s, want a denial naming PCR %d", code, body, keysvc.WindowPCR)
		}
		// Nor can learn mode capture the state after an unlock.
		e.admin(t, "POST", "/v1/admin/vms/learner/policy/learn", nil, http.StatusOK)
		code, body = e.unlock(t, v, "learner", vol)
		if m := wantRefusal(t, code, body, api.ReasonPolicy); !strings.Contains(fmt.Sprint(m["hint"]), "already extended") {
			t.Fatalf("learning after an unlock: %s, want a refusal saying PCR %d is extended", body, keysvc.WindowPCR)
		}
		var vmInfo struct {
			LearnArmed bool `json:"learn_armed"`
		}
		json.Unmarshal(e.admin(t, "GET", "/v1/admin/vms/learner", nil, http.StatusOK), &vmInfo)
		if !vmInfo.LearnArmed {
			t.Fatal("a refused learning attempt disarmed learn mode")
		}
		// After a reboot the window is open again and learning succeeds.
		if err := v.tpm.Reboot(); err != nil {
			t.Fatal(err)
		}
		if code, body := e.unlock(t, v, "learner", vol); code != http.StatusOK {
			t.Fatalf("learning after a reboot: %d %s", code, body)
		}
	})

	t.Run("unknown-ek", func(t *testing.T) {
		vol := setup(t, e, v, "ek")
		code, body := e.vm(t, "POST", "/v1/challenge", api.ChallengeRequest{VM: "ek", Volume: vol, EKPub: randomPEM(t), AKPub: v.akPEM})
		wantRefusal(t, code, body, api.ReasonUnknownEK)
	})

	t.Run("unknown-vm", func(t *testing.T) {
		code, body := e.vm(t, "POST", "/v1/challenge", api.ChallengeRequest{VM: "nobody", Volume: "x", EKPub: v.ekPEM, AKPub: v.akPEM})
		wantRefusal(t, code, body, api.ReasonUnknownVM)
	})

	t.Run("ak-not-enrolled", func(t *testing.T) {
		e.admin(t, "POST", "/v1/admin/vms", api.EnrollRequest{Name: "noak", EKPub: v.ekPEM}, http.StatusCreated)
		info := e.admin(t, "GET", "/v1/admin/vms/noak", nil, http.StatusOK)
		if !strings.Contains(string(info), "credential activation") {
			t.Fatalf("vm show does not say what to do next: %s", info)
		}
		e.admin(t, "POST", "/v1/admin/volumes", api.VolumeRequest{ID: "noak-vol", VM: "noak"}, http.StatusCreated)
		code, body := e.vm(t, "POST", "/v1/challenge", api.ChallengeRequest{VM: "noak", Volume: "noak-vol", EKPub: v.ekPEM, AKPub: v.akPEM})
		wantRefusal(t, code, body, api.ReasonNoAK)
		// Once the operator enrolls the AK, the VM can unlock.
		e.admin(t, "PUT", "/v1/admin/vms/noak/ak", api.SetAKRequest{AKPub: v.akPEM}, http.StatusOK)
		e.admin(t, "PUT", "/v1/admin/vms/noak/policy", v.pcrPolicy(t, 7), http.StatusOK)
		if code, body := e.unlock(t, v, "noak", "noak-vol"); code != http.StatusOK {
			t.Fatalf("unlock after set-ak: %d %s", code, body)
		}
	})

	t.Run("ak-not-bound", func(t *testing.T) {
		// The VM enrolled another AK: this TPM's AK is not trusted.
		e.admin(t, "POST", "/v1/admin/vms", api.EnrollRequest{Name: "otherak", EKPub: v.ekPEM, AKPub: randomPEM(t)}, http.StatusCreated)
		e.admin(t, "POST", "/v1/admin/volumes", api.VolumeRequest{ID: "otherak-vol", VM: "otherak"}, http.StatusCreated)
		code, body := e.vm(t, "POST", "/v1/challenge", api.ChallengeRequest{VM: "otherak", Volume: "otherak-vol", EKPub: v.ekPEM, AKPub: v.akPEM})
		wantRefusal(t, code, body, api.ReasonUnknownAK)
	})

	t.Run("revoked", func(t *testing.T) {
		vol := setup(t, e, v, "revoked")
		_, body := e.unlock(t, v, "revoked", vol)
		var ur api.UnlockResponse
		json.Unmarshal(body, &ur)
		e.admin(t, "POST", "/v1/admin/vms/revoked/revoke", nil, http.StatusOK)
		code, body := e.vm(t, "POST", "/v1/challenge", api.ChallengeRequest{VM: "revoked", Volume: vol, EKPub: v.ekPEM, AKPub: v.akPEM})
		wantRefusal(t, code, body, api.ReasonRevoked)
		code, body = e.do(t, "GET", "https://"+e.svc.VMAddr()+"/v1/session", ur.Session, nil)
		if code != http.StatusOK || !strings.Contains(string(body), `"revoked"`) {
			t.Fatalf("session after revoke: %d %s", code, body)
		}
	})

	t.Run("erased", func(t *testing.T) {
		vol := setup(t, e, v, "erased")
		ch := e.challenge(t, v, "erased", vol)
		e.admin(t, "POST", "/v1/admin/volumes/"+vol+"/erase", nil, http.StatusOK)
		code, body := e.vm(t, "POST", "/v1/unlock", api.UnlockRequest{Challenge: ch.Challenge, Attestation: v.quote(t, ch.Nonce)})
		wantRefusal(t, code, body, api.ReasonErased)
		if bytes.Contains(body, []byte("import_blob")) {
			t.Fatal("an erased volume's answer carries a blob")
		}
	})

	t.Run("tampered-attestation", func(t *testing.T) {
		vol := setup(t, e, v, "tamper")
		for _, tc := range []struct {
			name   string
			tamper func(att, other *pb.Attestation)
		}{
			{"flipped-signature", func(att, _ *pb.Attestation) {
				for _, q := range att.Quotes {
					q.RawSig[len(q.RawSig)-3] ^= 1
				}
			}},
			{"swapped-quote", func(att, other *pb.Attestation) {
				for i := range att.Quotes {
					att.Quotes[i].Quote = other.Quotes[i].Quote
				}
			}},
			{"not-a-proto", nil},
		} {
			t.Run(tc.name, func(t *testing.T) {
				ch := e.challenge(t, v, "tamper", vol)
				raw := []byte("\xff\xff garbage")
				if tc.tamper != nil {
					att, err := v.tpm.Attest(api.QuoteData(ch.Nonce, e.ca), tpm.ECC)
					if err != nil {
						t.Fatal(err)
					}
					other, err := v.tpm.Attest(bytes.Repeat([]byte{2}, 32), tpm.ECC)
					if err != nil {
						t.Fatal(err)
					}
					tc.tamper(att, other)
					raw, _ = proto.Marshal(att)
				}
				code, body := e.vm(t, "POST", "/v1/unlock", api.UnlockRequest{Challenge: ch.Challenge, Attestation: raw})
				wantRefusal(t, code, body, api.ReasonEvidence)
			})
		}
	})

	t.Run("events", func(t *testing.T) {
		vol := setup(t, e, v, "events")
		_, body := e.unlock(t, v, "events", vol)
		var ur api.UnlockResponse
		json.Unmarshal(body, &ur)
		code, body := e.vm(t, "POST", "/v1/events", api.EventsRequest{Session: ur.Session, Events: []api.Event{
			{Kind: "heartbeat", Severity: "info"}, {Kind: "ptrace", Severity: "critical", PID: 42, Comm: "gdb"}}})
		if code != http.StatusOK || !strings.Contains(string(body), `"accepted":2`) {
			t.Fatalf("events: %d %s", code, body)
		}
		code, _ = e.vm(t, "POST", "/v1/events", api.EventsRequest{Session: ur.Session + "x", Events: []api.Event{{Kind: "k", Severity: "info"}}})
		if code != http.StatusUnauthorized {
			t.Fatalf("events with a forged session: %d", code)
		}
		code, _ = e.vm(t, "POST", "/v1/events", map[string]any{"session": ur.Session, "events": []any{}, "extra": 1})
		if code != http.StatusBadRequest {
			t.Fatalf("unknown field: %d, want 400", code)
		}
	})

	t.Run("admin-needs-token", func(t *testing.T) {
		for _, tok := range []string{"", "wrong", e.token + "0"} {
			for _, path := range []string{"/v1/admin/vms", "/v1/admin/no-such-route"} {
				code, body := e.do(t, "GET", "https://"+e.svc.AdminAddr()+path, tok, nil)
				if code != http.StatusUnauthorized {
					t.Fatalf("token %q %s: %d %s, want 401", tok, path, code, body)
				}
			}
		}
		var recs []struct {
			Actor   string
			Action  string
			Details json.RawMessage
		}
		json.Unmarshal(e.admin(t, "GET", "/v1/admin/audit", nil, http.StatusOK), &recs)
		n := 0
		for _, r := range recs {
			if r.Actor == "anonymous" && strings.Contains(string(r.Details), `"status":401`) {
				n++
			}
		}
		if n != 6 {
			t.Fatalf("%d refused admin calls audited, want 6", n)
		}
	})

	t.Run("audit-and-metrics", func(t *testing.T) {
		var rep api.AuditVerifyResponse
		json.Unmarshal(e.admin(t, "GET", "/v1/admin/audit/verify", nil, http.StatusOK), &rep)
		if !rep.OK || rep.Records < 10 {
			t.Fatalf("audit verify: %+v", rep)
		}
		var recs []struct {
			Action  string
			Subject string
			Details json.RawMessage
		}
		json.Unmarshal(e.admin(t, "GET", "/v1/admin/audit", nil, http.StatusOK), &recs)
		seen := map[string]bool{}
		for _, r := range recs {
			d := string(r.Details)
			switch {
			case r.Action == "deny" && strings.Contains(d, `"pcr":7`):
				seen["deny with PCR 7"] = true
			case r.Action == "deny" && strings.Contains(d, `"reason":"erased`):
				seen["deny erased"] = true
			case r.Action == "unlock" && strings.Contains(d, `"session_id"`):
				seen["unlock"] = true
			case r.Action == "learn" && strings.Contains(d, `"pcrs"`) && strings.Contains(d, `"policy":{"pcrs"`) && strings.Contains(d, `"sha256"`):
				seen["learn capture"] = true
			case r.Action == "erase", r.Action == "revoke", r.Action == "enroll", r.Action == "alert":
				seen[r.Action] = true
			}
		}
		for _, want := range []string{"deny with PCR 7", "deny erased", "unlock", "learn capture", "erase", "revoke", "enroll", "alert"} {
			if !seen[want] {
				t.Errorf("no %s record in the audit log", want)
			}
		}
		code, body := e.do(t, "GET", "https://"+e.svc.AdminAddr()+"/metrics", "", nil)
		if code != http.StatusOK {
			t.Fatalf("metrics: %d", code)
		}
		for _, want := range []string{"keysvc_unlocks_total", `keysvc_denials_total{reason="erased"} 1`, `keysvc_vm_events_total{kind="other",severity="critical"} 1`,
			`keysvc_requests_total{api="vm",code="200",route="POST /v1/unlock"}`, "keysvc_request_duration_seconds_bucket"} {
			if !strings.Contains(string(body), want) {
				t.Errorf("metrics lack %s", want)
			}
		}
	})
}

// body0 runs one more unlock and returns its 200 body.
func body0(t *testing.T, e *env, v *vmTPM, name, vol string) []byte {
	t.Helper()
	code, body := e.unlock(t, v, name, vol)
	if code != http.StatusOK {
		t.Fatalf("unlock: %d %s", code, body)
	}
	return body
}

func TestRestartKeepsEverything(t *testing.T) {
	dir := t.TempDir()
	e := startEnv(t, dir)
	v := openVM(t)
	vol := setup(t, e, v, "keep")
	ca1, _ := os.ReadFile(filepath.Join(dir, keysvc.CAFile))
	e.stop(t)

	for _, f := range []string{keysvc.MasterKeyFile, keysvc.AdminTokenFile, keysvc.CAKeyFile, keysvc.CertKeyFile} {
		fi, err := os.Stat(filepath.Join(dir, f))
		if err != nil || fi.Mode().Perm() != 0o600 {
			t.Fatalf("%s: %v %v, want mode 0600", f, fi.Mode(), err)
		}
	}
	e2 := startEnv(t, dir)
	if len(e2.svc.Data.Created) != 0 {
		t.Fatalf("restart created %v", e2.svc.Data.Created)
	}
	if e2.token != e.token {
		t.Fatal("admin token changed across a restart")
	}
	ca2, _ := os.ReadFile(filepath.Join(dir, keysvc.CAFile))
	if !bytes.Equal(ca1, ca2) {
		t.Fatal("CA changed across a restart")
	}
	code, body := e2.unlock(t, v, "keep", vol)
	if code != http.StatusOK {
		t.Fatalf("unlock after restart: %d %s", code, body)
	}
	uk, err := v.importBlob(t, body, tpm.ECC)
	if err != nil || !bytes.Equal(uk, ukBytes) {
		t.Fatalf("import after restart: %v", err)
	}
	var rep api.AuditVerifyResponse
	json.Unmarshal(e2.admin(t, "GET", "/v1/admin/audit/verify", nil, http.StatusOK), &rep)
	if !rep.OK {
		t.Fatalf("audit chain after restart: %+v", rep)
	}
}

// TestAuditTamperDetected edits one audit row and deletes another behind
// the service's back (as someone with write access to the database would),
// restarts it, and expects `audit verify` to name both.
func TestAuditTamperDetected(t *testing.T) {
	dir := t.TempDir()
	e := startEnv(t, dir)
	v := openVM(t)
	vol := setup(t, e, v, "t")
	for _, n := range []string{"a", "b", "c"} {
		e.admin(t, "POST", "/v1/admin/vms", api.EnrollRequest{Name: n, EKPub: randomPEM(t)}, http.StatusCreated)
	}
	e.stop(t)
	db, err := sql.Open("sqlite", filepath.Join(dir, store.DBFile))
	if err != nil {
		t.Fatal(err)
	}
	for _, q := range []string{
		"DROP TRIGGER audit_log_no_update", "DROP TRIGGER audit_log_no_delete",
		"UPDATE audit_log SET subject = 'evil' WHERE seq = 2",
		"DELETE FROM audit_log WHERE seq = 4",
		// The chain's end too, so that Append refuses to extend it.
		"UPDATE audit_log SET actor = 'evil' WHERE seq = (SELECT max(seq) FROM audit_log)",
	} {
		if _, err := db.Exec(q); err != nil {
			t.Fatalf("%s: %v", q, err)
		}
	}
	db.Close()
	e2 := startEnv(t, dir)
	var rep api.AuditVerifyResponse
	json.Unmarshal(e2.admin(t, "GET", "/v1/admin/audit/verify", nil, http.StatusOK), &rep)
	all := strings.Join(rep.Problems, "\n")
	if rep.OK || !strings.Contains(all, "seq 2: edited") || !strings.Contains(all, "missing") {
		t.Fatalf("tampering not reported: %+v", rep)
	}
	// Fail closed: a release that cannot be audited releases nothing.
	code, body := e2.unlock(t, v, "t", vol)
	if code != http.StatusInternalServerError || bytes.Contains(body, []byte("import_blob")) {
		t.Fatalf("unlock on a broken audit chain: %d %s", code, body)
	}
}

// syncBuffer is a bytes.Buffer safe for the service's concurrent logging.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}
func (s *syncBuffer) String() string { s.mu.Lock(); defer s.mu.Unlock(); return s.b.String() }

// TestNoSecretsInLogsOrAudit runs an unlock, events and admin calls with
// debug logging on, then looks for every secret in the logs and the audit
// records: the admin token, the session token, the import blob and the UK.
func TestNoSecretsInLogsOrAudit(t *testing.T) {
	var logs syncBuffer
	e := startEnv(t, t.TempDir(), keysvc.WithLogger(slog.New(slog.NewJSONHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug}))))
	v := openVM(t)
	vol := setup(t, e, v, "quiet")
	code, body := e.unlock(t, v, "quiet", vol)
	if code != http.StatusOK {
		t.Fatalf("unlock: %d %s", code, body)
	}
	var ur api.UnlockResponse
	json.Unmarshal(body, &ur)
	e.vm(t, "POST", "/v1/events", api.EventsRequest{Session: ur.Session, Events: []api.Event{{Kind: "ptrace", Severity: "warning"}}})
	e.do(t, "GET", "https://"+e.svc.AdminAddr()+"/v1/admin/vms", "wrong-token", nil)
	records := string(e.admin(t, "GET", "/v1/admin/audit", nil, http.StatusOK))
	secrets := map[string]string{
		"admin token":   e.token,
		"session token": ur.Session,
		"session MAC":   ur.Session[strings.LastIndex(ur.Session, ".")+1:],
		"import blob":   base64.StdEncoding.EncodeToString(ur.ImportBlob)[:40],
		"UK (hex)":      hex.EncodeToString(ukBytes),
		"UK (base64)":   base64.StdEncoding.EncodeToString(ukBytes),
		"UK (raw)":      string(ukBytes),
	}
	for what, s := range secrets {
		if strings.Contains(logs.String(), s) {
			t.Errorf("the log holds the %s", what)
		}
		if strings.Contains(records, s) {
			t.Errorf("the audit log holds the %s", what)
		}
	}
	if !strings.Contains(logs.String(), `"msg":"unlock"`) {
		t.Fatal("the log has no unlock line: is the logger wired?")
	}
}

func TestTLS13Only(t *testing.T) {
	e := startEnv(t, t.TempDir())
	for _, addr := range []string{e.svc.VMAddr(), e.svc.AdminAddr()} {
		c, err := tls.Dial("tcp", addr, &tls.Config{InsecureSkipVerify: true, MaxVersion: tls.VersionTLS12})
		if err == nil {
			c.Close()
			t.Fatalf("%s accepted TLS 1.2", addr)
		}
	}
}

func TestProvision(t *testing.T) {
	e := startEnv(t, t.TempDir())
	v := openVM(t)
	e.admin(t, "POST", "/v1/admin/vms", api.EnrollRequest{Name: "fresh", EKPub: v.ekPEM, AKPub: v.akPEM, ProvisioningAllowed: true}, http.StatusCreated)
	e.admin(t, "PUT", "/v1/admin/vms/fresh/policy", v.pcrPolicy(t, 7), http.StatusOK)
	provision := func(volume string) (int, []byte) {
		ch := e.challenge(t, v, "fresh", volume)
		return e.vm(t, "POST", "/v1/provision", api.UnlockRequest{Challenge: ch.Challenge, Attestation: v.quote(t, ch.Nonce)})
	}
	code, body := provision("blank")
	if code != http.StatusOK {
		t.Fatalf("provision: %d %s", code, body)
	}
	uk, err := v.importBlob(t, body, tpm.ECC)
	if err != nil || len(uk) != api.UKSize {
		t.Fatalf("import provisioned UK: %d bytes, %v", len(uk), err)
	}
	code, body = e.unlock(t, v, "fresh", "blank")
	if code != http.StatusOK {
		t.Fatalf("unlock after provisioning: %d %s", code, body)
	}
	if again, err := v.importBlob(t, body, tpm.ECC); err != nil || !bytes.Equal(again, uk) {
		t.Fatalf("unlock gives another UK than provisioning: %v", err)
	}
	code, body = provision("blank")
	wantRefusal(t, code, body, api.ReasonVolumeExists)

	// A VM without provisioning gets no challenge for a volume that does not exist.
	e.admin(t, "POST", "/v1/admin/vms", api.EnrollRequest{Name: "strict", EKPub: v.ekPEM, AKPub: v.akPEM}, http.StatusCreated)
	code, body = e.vm(t, "POST", "/v1/challenge", api.ChallengeRequest{VM: "strict", Volume: "blank2", EKPub: v.ekPEM, AKPub: v.akPEM})
	wantRefusal(t, code, body, api.ReasonUnknownVolume)
	// … and cannot provision one that does.
	e.admin(t, "POST", "/v1/admin/volumes", api.VolumeRequest{ID: "strict-vol", VM: "strict"}, http.StatusCreated)
	ch := e.challenge(t, v, "strict", "strict-vol")
	code, body = e.vm(t, "POST", "/v1/provision", api.UnlockRequest{Challenge: ch.Challenge, Attestation: v.quote(t, ch.Nonce)})
	wantRefusal(t, code, body, api.ReasonNoProvisioning)
}

// wantReplay checks that an unlock was refused because its challenge was
// used already.
func wantReplay(t *testing.T, code int, body []byte) {
	t.Helper()
	m := wantRefusal(t, code, body, api.ReasonChallenge)
	if !strings.Contains(m["hint"].(string), "already used") {
		t.Fatalf("hint %q does not say the challenge was used", m["hint"])
	}
}
