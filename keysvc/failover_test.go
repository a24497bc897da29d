package keysvc_test

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/keygate/keygate/internal/pgtest"
	"github.com/keygate/keygate/keysvc"
)

// released is one unlock a VM got a blob for.
type released struct {
	challenge keysvc.UnlockRequest
	session   string // the session's ID, which the unlock's audit record names
	at        time.Time
}

// sessionID reads the ID out of an unlock answer's session token (s1.
// base64(claims) . mac): the audit record names the session by it.
func sessionID(t testing.TB, body []byte) string {
	t.Helper()
	var ur keysvc.UnlockResponse
	if err := json.Unmarshal(body, &ur); err != nil {
		t.Fatal(err)
	}
	payload, _, _ := strings.Cut(strings.TrimPrefix(ur.Session, "s1."), ".")
	b, err := base64.RawURLEncoding.DecodeString(payload)
	if err != nil {
		t.Fatalf("session token %q: %v", ur.Session, err)
	}
	var c struct{ ID string }
	if err := json.Unmarshal(b, &c); err != nil || c.ID == "" {
		t.Fatalf("session claims %s: %v", b, err)
	}
	return c.ID
}

// unlockLoop unlocks through the replicas in turn (challenge at one, unlock
// at the next, as a VM failing over would) until stop closes, and returns
// every unlock that released a blob. Refusals other than 503 fail the test.
func unlockLoop(t *testing.T, reps []*env, v *vmTPM, vm, vol string, stop <-chan struct{}, got func(released)) {
	for i := 0; ; i++ {
		select {
		case <-stop:
			return
		default:
		}
		a, b := reps[i%len(reps)], reps[(i+1)%len(reps)]
		code, body, err := a.post("/v1/challenge", keysvc.ChallengeRequest{VM: vm, Volume: vol, EKPub: v.ekPEM, AKPub: v.akPEM})
		if err != nil || code == http.StatusServiceUnavailable {
			time.Sleep(50 * time.Millisecond)
			continue
		}
		if code != http.StatusOK {
			t.Errorf("challenge: %d %s", code, body)
			return
		}
		var ch keysvc.ChallengeResponse
		if err := json.Unmarshal(body, &ch); err != nil {
			t.Error(err)
			return
		}
		req := keysvc.UnlockRequest{Challenge: ch.Challenge, Attestation: v.quote(t, ch.Nonce)}
		code, body, err = b.post("/v1/unlock", req)
		switch {
		case err != nil || code == http.StatusServiceUnavailable:
			time.Sleep(50 * time.Millisecond)
		case code == http.StatusOK:
			got(released{challenge: req, session: sessionID(t, body), at: time.Now()})
		default:
			t.Errorf("unlock: %d %s", code, body)
			return
		}
	}
}

// TestFailover: two replicas on a primary with a synchronous hot standby,
// under a steady load of unlocks. The primary is killed (pg_ctl stop -m
// immediate) and the standby promoted; the replicas follow it through the
// multi-host URL. Afterwards every unlock that released a blob has its
// audit record, none of those challenges can be redeemed again at either
// replica, and the audit chain verifies.
func TestFailover(t *testing.T) {
	primary := pgtest.New(t, pgtest.Options{Conf: pgtest.SyncReplication})
	standby := primary.Standby(t)
	if err := primary.Exec("postgres", "CREATE DATABASE keysvc"); err != nil {
		t.Fatal(err)
	}
	url := pgtest.MultiHostURL("keysvc", primary, standby)
	a := startEnvWith(t, keysvc.Config{DataDir: t.TempDir(), DB: url})
	b := startEnvWith(t, keysvc.Config{DataDir: replicaDir(t, a.dir), DB: url})
	v := openVM(t)
	vol := setup(t, a, v, "web-1")

	var (
		mu   sync.Mutex
		rels []released
	)
	count := func() int { mu.Lock(); defer mu.Unlock(); return len(rels) }
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		unlockLoop(t, []*env{a, b}, v, "web-1", vol, stop, func(r released) { mu.Lock(); rels = append(rels, r); mu.Unlock() })
	}()
	defer func() {
		select {
		case <-stop:
		default:
			close(stop)
		}
		<-done
	}()

	waitFor(t, "unlocks before the failover", func() bool { return count() >= 10 })
	killed := time.Now()
	if err := primary.Stop("immediate"); err != nil {
		t.Fatal(err)
	}
	before := count()
	if err := standby.Promote(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "unlocks after the promotion", func() bool { return count() >= before+10 })
	close(stop)
	<-done
	mu.Lock()
	defer mu.Unlock()
	for _, r := range rels {
		if r.at.After(killed) {
			t.Logf("failover: %d unlocks before the kill, first unlock after it %v later (primary killed, standby promoted, replicas reconnected)",
				before, r.at.Sub(killed).Round(time.Millisecond))
			break
		}
	}

	// Every released blob has its audit record on the promoted server.
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, url)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	rows, _ := conn.Query(ctx, `SELECT details FROM audit_log WHERE action = 'unlock'`)
	recorded := map[string]bool{}
	details, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range details {
		var u struct {
			SessionID string `json:"session_id"`
		}
		json.Unmarshal([]byte(d), &u)
		recorded[u.SessionID] = true
	}
	for _, r := range rels {
		if !recorded[r.session] {
			t.Errorf("unlock at %v released a blob (session %s) but has no audit record after the failover", r.at, r.session)
		}
	}
	// No released challenge is redeemable again, at either replica: its
	// use survived the failover.
	for _, r := range rels {
		for _, e := range []*env{a, b} {
			code, body := e.vm(t, "POST", "/v1/unlock", r.challenge)
			if code == http.StatusOK {
				t.Fatalf("a challenge released before was released again after the failover (session %s)", r.session)
			}
			wantRefusal(t, code, body, keysvc.ReasonChallenge)
		}
	}
	for _, e := range []*env{a, b} {
		if body := e.admin(t, "GET", "/v1/admin/audit/verify", nil, http.StatusOK); !strings.Contains(string(body), `"ok":true`) {
			t.Errorf("audit verify after the failover: %s", body)
		}
	}
	t.Logf("%d unlocks released, each audited, none releasable again", len(rels))
}
