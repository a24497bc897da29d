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
	"github.com/keygate/keygate/keysvc/api"
)

// releasedBlob is one unlock a VM got a blob for.
type releasedBlob struct {
	challenge api.UnlockRequest
	session   string    // the session's ID, which the unlock's audit record names
	asked, at time.Time // when its challenge was asked for, and the blob received
}

// sessionID reads the ID out of an unlock answer's session token (s1.
// base64(claims) . mac): the audit record names the session by it.
func sessionID(t testing.TB, body []byte) string {
	t.Helper()
	var ur api.UnlockResponse
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

// replica is a key service a VM can reach: in this process (*env) or
// another (child).
type replica interface {
	post(path string, body any) (int, []byte, error)
}

// postAny posts to the replicas in turn from first, as a VM with several
// replicas in its list does: one that is unreachable or answers 503 costs a
// try at the next; any other answer is final.
func postAny(reps []replica, first int, path string, body any) (code int, b []byte, cut bool, err error) {
	for i := range reps {
		code, b, err = reps[(first+i)%len(reps)].post(path, body)
		if err == nil && code != http.StatusServiceUnavailable {
			return code, b, cut, nil
		}
		// A transport error may come after the replica committed the
		// request (a replica killed before its answer left), and so may a
		// 503: the database died after the COMMIT reached it but before
		// its acknowledgement did.
		cut = cut || err != nil || code == http.StatusServiceUnavailable
	}
	return code, b, cut, err
}

// unlockLoop unlocks through the replicas in turn (challenge at one, unlock
// at the next) until stop closes, calling got for every unlock that
// released a blob. An answer other than success, 503 or an unreachable
// replica fails the test.
func unlockLoop(t *testing.T, reps []replica, v *vmTPM, vm, vol string, stop <-chan struct{}, got func(releasedBlob)) {
	for i := 0; ; i++ {
		select {
		case <-stop:
			return
		default:
		}
		asked := time.Now()
		code, body, _, err := postAny(reps, i, "/v1/challenge", api.ChallengeRequest{VM: vm, Volume: vol, EKPub: v.ekPEM, AKPub: v.akPEM})
		if err != nil || code == http.StatusServiceUnavailable {
			time.Sleep(50 * time.Millisecond)
			continue
		}
		if code != http.StatusOK {
			t.Errorf("challenge: %d %s", code, body)
			return
		}
		var ch api.ChallengeResponse
		if err := json.Unmarshal(body, &ch); err != nil {
			t.Error(err)
			return
		}
		req := api.UnlockRequest{Challenge: ch.Challenge, Attestation: v.quote(t, ch.Nonce)}
		code, body, cut, err := postAny(reps, i+1, "/v1/unlock", req)
		switch {
		case err != nil || code == http.StatusServiceUnavailable:
			time.Sleep(50 * time.Millisecond)
		case cut && code == http.StatusForbidden && strings.Contains(string(body), `"reason":"challenge"`):
			// The first replica took the challenge and died (or lost its
			// database) before it answered: the VM never got that blob,
			// and the challenge is not released twice. A VM asks for a new
			// challenge, as here.
		case code == http.StatusOK:
			got(releasedBlob{challenge: req, session: sessionID(t, body), asked: asked, at: time.Now()})
		default:
			t.Errorf("unlock: %d %s", code, body)
			return
		}
	}
}

// unlockLoad runs unlockLoop in the background and collects its releases.
type loadRun struct {
	mu   sync.Mutex
	rels []releasedBlob
	stop chan struct{}
	done chan struct{}
}

func startLoad(t *testing.T, reps []replica, v *vmTPM, vm, vol string) *loadRun {
	l := &loadRun{stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(l.done)
		unlockLoop(t, reps, v, vm, vol, l.stop, func(r releasedBlob) { l.mu.Lock(); l.rels = append(l.rels, r); l.mu.Unlock() })
	}()
	t.Cleanup(l.finish)
	return l
}

func (l *loadRun) count() int { l.mu.Lock(); defer l.mu.Unlock(); return len(l.rels) }

// finish stops the load and returns every release.
func (l *loadRun) finish() {
	select {
	case <-l.stop:
	default:
		close(l.stop)
	}
	<-l.done
}

// checkReleases checks, on the database url names, that every release has
// its audit record, that none of their challenges is redeemable again at
// any of reps, and that the chain verifies at e.
func checkReleases(t *testing.T, url string, rels []releasedBlob, reps []replica, e *env) {
	t.Helper()
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, url)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	rows, _ := conn.Query(ctx, `SELECT details FROM audit_log WHERE action = 'unlock'`)
	details, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		t.Fatal(err)
	}
	recorded := map[string]bool{}
	for _, d := range details {
		var u struct {
			SessionID string `json:"session_id"`
		}
		json.Unmarshal([]byte(d), &u)
		recorded[u.SessionID] = true
	}
	for _, r := range rels {
		if !recorded[r.session] {
			t.Errorf("unlock at %v released a blob (session %s) but has no audit record", r.at, r.session)
		}
		for _, rep := range reps {
			code, body, err := rep.post("/v1/unlock", r.challenge)
			if err != nil {
				t.Fatal(err)
			}
			if code == http.StatusOK {
				t.Fatalf("a challenge released before was released again (session %s)", r.session)
			}
			wantRefusal(t, code, body, api.ReasonChallenge)
		}
	}
	if body := e.admin(t, "GET", "/v1/admin/audit/verify", nil, http.StatusOK); !strings.Contains(string(body), `"ok":true`) {
		t.Errorf("audit verify: %s", body)
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

	reps := []replica{a, b}
	load := startLoad(t, reps, v, "web-1", vol)
	waitFor(t, "unlocks before the failover", func() bool { return load.count() >= 10 })
	killed := time.Now()
	if err := primary.Stop("immediate"); err != nil {
		t.Fatal(err)
	}
	before := load.count()
	if err := standby.Promote(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "unlocks after the promotion", func() bool { return load.count() >= before+10 })
	load.finish()
	rels := load.rels
	for _, r := range rels {
		if r.asked.After(killed) {
			t.Logf("failover: %d unlocks before the kill; the first unlock begun after it released %v after the kill (primary killed, standby promoted, replicas reconnected)",
				before, r.at.Sub(killed).Round(time.Millisecond))
			break
		}
	}
	for _, e := range []*env{a, b} {
		// The load may have gone through one replica while the other's
		// database monitor still waited for its next probe.
		waitFor(t, "both replicas ready", func() bool {
			code, _ := e.do(t, "GET", "https://"+e.svc.AdminAddr()+"/readyz", "", nil)
			return code == http.StatusOK
		})
	}
	checkReleases(t, url, rels, reps, b)
	t.Logf("%d unlocks released, each audited, none releasable again", len(rels))
}

// TestReplicaKilled: a replica in its own process is SIGKILLed mid-load.
// Every unlock it acknowledged has its audit record and its challenge's use
// (no acknowledged write is lost), and VMs pointed at both replicas keep
// unlocking through the other.
func TestReplicaKilled(t *testing.T) {
	url := pgtest.Shared(t).NewDB(t)
	a := startEnvWith(t, keysvc.Config{DataDir: t.TempDir(), DB: url})
	v := openVM(t)
	vol := setup(t, a, v, "web-1")
	c := startChild(t, a, replicaDir(t, a.dir), url)
	reps := []replica{c, a}
	load := startLoad(t, reps, v, "web-1", vol)
	waitFor(t, "unlocks before the kill", func() bool { return load.count() >= 10 })
	if err := c.cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	c.cmd.Wait()
	before := load.count()
	waitFor(t, "unlocks after the kill", func() bool { return load.count() >= before+10 })
	load.finish()
	checkReleases(t, url, load.rels, []replica{a}, a)
}
