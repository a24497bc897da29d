package keysvc_test

import (
	"bytes"
	"context"
	"fmt"
	"net/http"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/keygate/keygate/internal/pgtest"
	"github.com/keygate/keygate/keysvc"
	"github.com/keygate/keygate/keysvc/api"
	"github.com/keygate/keygate/keysvc/audit"
	"github.com/keygate/keygate/keysvc/masterkey"
	"github.com/keygate/keygate/keysvc/store"
)

// hookAuditor is an audit log that runs hook just before the first unlock
// record is appended: the moment between verification and release.
type hookAuditor struct {
	*audit.Log
	once sync.Once
	hook func()
}

func (a *hookAuditor) Append(ctx context.Context, ev audit.Event) (audit.Record, error) {
	if ev.Action == audit.ActionUnlock && a.hook != nil {
		a.once.Do(a.hook)
	}
	return a.Log.Append(ctx, ev)
}

func (a *hookAuditor) AppendUsing(ctx context.Context, use store.ChallengeUse, ev audit.Event) (audit.Record, error) {
	if ev.Action == audit.ActionUnlock && a.hook != nil {
		a.once.Do(a.hook)
	}
	return a.Log.AppendUsing(ctx, use, ev)
}

// AppendVia is the path an unlock's release record takes where the store
// re-reads in the commit's round trip (the SQLite and PostgreSQL stores).
func (a *hookAuditor) AppendVia(ctx context.Context, ev audit.Event, via func(store.AuditNext) error) (audit.Record, error) {
	if ev.Action == audit.ActionUnlock && a.hook != nil {
		a.once.Do(a.hook)
	}
	return a.Log.AppendVia(ctx, ev, via)
}

// TestReleaseRechecksAfterRace: an erase or revoke that commits while an
// unlock is being verified must win; the unlock gets a refusal, never a
// blob. On PostgreSQL the re-read rides in the release record's commit
// (store.AppendAuditUsingThenRead), after its COMMIT.
func TestReleaseRechecksAfterRace(t *testing.T) {
	v := openVM(t)
	for _, tc := range []struct {
		name, path, reason string
		db                 string
	}{
		{"erase", "/v1/admin/volumes/racer-vol/erase", api.ReasonErased, "sqlite"},
		{"revoke", "/v1/admin/vms/racer/revoke", api.ReasonRevoked, "sqlite"},
		{"erase-postgres", "/v1/admin/volumes/racer-vol/erase", api.ReasonErased, "postgres"},
		{"revoke-postgres", "/v1/admin/vms/racer/revoke", api.ReasonRevoked, "postgres"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			db := ""
			if tc.db == "postgres" {
				db = pgtest.Shared(t).NewDB(t)
			}
			ha := &hookAuditor{Log: replicaAuditOn(t, dir, db)}
			e := startEnvWith(t, keysvc.Config{DataDir: dir, DB: db}, keysvc.WithAudit(ha))
			vol := setup(t, e, v, "racer")

			var hookErr error
			ha.hook = func() {
				req, _ := http.NewRequest("POST", "https://"+e.svc.AdminAddr()+tc.path, nil)
				req.Header.Set("Authorization", "Bearer "+e.token)
				resp, err := e.client.Do(req)
				if err == nil {
					resp.Body.Close()
					if resp.StatusCode != http.StatusOK {
						err = fmt.Errorf("%s answered %d", tc.path, resp.StatusCode)
					}
				}
				hookErr = err
			}
			code, body := e.unlock(t, v, "racer", vol)
			if hookErr != nil {
				t.Fatalf("racing %s: %v", tc.name, hookErr)
			}
			wantRefusal(t, code, body, tc.reason)
			if bytes.Contains(body, []byte("import_blob")) {
				t.Fatalf("the unlock that raced %s carries a blob", tc.name)
			}
		})
	}
}

// jumpClock reads the real time until armed; once armed, the first reading
// is still the real time and every later one is d ahead: time jumps right
// after the unlock's challenge check.
type jumpClock struct {
	mu    sync.Mutex
	d     time.Duration
	armed bool
	reads int
}

func (c *jumpClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.armed {
		c.reads++
		if c.reads > 1 {
			return time.Now().Add(c.d)
		}
	}
	return time.Now()
}

func (c *jumpClock) arm(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.d, c.armed, c.reads = d, true, 0
}

// TestReleaseRefusedPastChallengeGrace: used challenges are purged some
// time after they expire, so a release whose challenge expired long before
// its record could be written (a stalled verification) is refused, never
// recorded as a fresh use.
func TestReleaseRefusedPastChallengeGrace(t *testing.T) {
	c := &jumpClock{}
	e := startEnv(t, t.TempDir(), keysvc.WithClock(c.Now))
	v := openVM(t)
	vol := setup(t, e, v, "slow")
	ch := e.challenge(t, v, "slow", vol)
	req := api.UnlockRequest{Challenge: ch.Challenge, Attestation: v.quote(t, ch.Nonce)}
	c.arm(time.Hour)
	code, body := e.vm(t, "POST", "/v1/unlock", req)
	m := wantRefusal(t, code, body, api.ReasonChallenge)
	if !strings.Contains(m["hint"].(string), "expired while") {
		t.Fatalf("hint %q does not say the challenge expired during the unlock", m["hint"])
	}
}

// replicaAudit opens the audit log of the service that will run on dir
// through a second handle on its database and master key, as another
// replica would hold them.
func replicaAudit(t *testing.T, dir string) *audit.Log { return replicaAuditOn(t, dir, "") }

// replicaAuditOn is replicaAudit on the database db names ("" for SQLite
// in dir).
func replicaAuditOn(t *testing.T, dir, db string) *audit.Log {
	t.Helper()
	mk, _, err := masterkey.LoadOrCreate(filepath.Join(dir, keysvc.MasterKeyFile))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(mk.Destroy)
	st, err := store.Open(context.Background(), db, dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	lg, err := audit.New(st, mk)
	if err != nil {
		t.Fatal(err)
	}
	return lg
}

// barrierAuditor holds each unlock's release append until n of them have
// arrived (or a minute has passed, so that a failure cannot hang the test).
type barrierAuditor struct {
	*audit.Log
	n       int
	mu      sync.Mutex
	arrived int
	all     chan struct{}
}

func (a *barrierAuditor) AppendUsing(ctx context.Context, use store.ChallengeUse, ev audit.Event) (audit.Record, error) {
	a.wait(ev)
	return a.Log.AppendUsing(ctx, use, ev)
}

func (a *barrierAuditor) Append(ctx context.Context, ev audit.Event) (audit.Record, error) {
	a.wait(ev)
	return a.Log.Append(ctx, ev)
}

func (a *barrierAuditor) AppendVia(ctx context.Context, ev audit.Event, via func(store.AuditNext) error) (audit.Record, error) {
	a.wait(ev)
	return a.Log.AppendVia(ctx, ev, via)
}

func (a *barrierAuditor) wait(ev audit.Event) {
	if ev.Action != audit.ActionUnlock {
		return
	}
	a.mu.Lock()
	a.arrived++
	if a.arrived == a.n {
		close(a.all)
	}
	a.mu.Unlock()
	select {
	case <-a.all:
	case <-time.After(time.Minute):
	}
}

// TestConcurrentCopiesReleaseOnce: copies of one valid unlock request that
// all pass the early replay check (the barrier holds every release until
// all have) must be released exactly once: the write that records the
// release and the challenge's use refuses the others.
func TestConcurrentCopiesReleaseOnce(t *testing.T) {
	const n = 6
	dir := t.TempDir()
	ba := &barrierAuditor{Log: replicaAudit(t, dir), n: n, all: make(chan struct{})}
	e := startEnv(t, dir, keysvc.WithAudit(ba))
	v := openVM(t)
	vol := setup(t, e, v, "copies")
	ch := e.challenge(t, v, "copies", vol)
	req := api.UnlockRequest{Challenge: ch.Challenge, Attestation: v.quote(t, ch.Nonce)}
	codes := make([]int, n)
	bodies := make([][]byte, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() { codes[i], bodies[i] = e.vm(t, "POST", "/v1/unlock", req) })
	}
	wg.Wait()
	ba.mu.Lock()
	arrived := ba.arrived
	ba.mu.Unlock()
	if arrived != n {
		t.Fatalf("%d of %d copies reached the release write; the test needs all of them there", arrived, n)
	}
	released := 0
	for i := range n {
		if codes[i] == http.StatusOK {
			released++
			continue
		}
		wantReplay(t, codes[i], bodies[i])
	}
	if released != 1 {
		t.Fatalf("%d of %d copies of one challenge were released, want exactly 1", released, n)
	}
}

// TestReleaseRechecksChangedEnrollment: an AK or policy change that commits
// while an unlock is being verified must win: the re-check after the
// release record compares the re-read AK and policy with the ones the quote
// was verified against, so the unlock gets a refusal, never a blob.
func TestReleaseRechecksChangedEnrollment(t *testing.T) {
	v := openVM(t)
	other := strings.Repeat("ab", 32)
	for _, tc := range []struct {
		name, path, body, reason string
	}{
		{"set-ak", "/v1/admin/vms/racer/ak", fmt.Sprintf(`{"ak_pub": %q}`, randomPEM(t)), api.ReasonUnknownAK},
		{"set-policy", "/v1/admin/vms/racer/policy", `{"pcrs": {"7": ["` + other + `"]}}`, api.ReasonPolicy},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			ha := &hookAuditor{Log: replicaAudit(t, dir)}
			e := startEnv(t, dir, keysvc.WithAudit(ha))
			vol := setup(t, e, v, "racer")

			var hookErr error
			ha.hook = func() {
				req, _ := http.NewRequest("PUT", "https://"+e.svc.AdminAddr()+tc.path, strings.NewReader(tc.body))
				req.Header.Set("Authorization", "Bearer "+e.token)
				req.Header.Set("Content-Type", "application/json")
				resp, err := e.client.Do(req)
				if err == nil {
					resp.Body.Close()
					if resp.StatusCode != http.StatusOK {
						err = fmt.Errorf("%s answered %d", tc.path, resp.StatusCode)
					}
				}
				hookErr = err
			}
			code, body := e.unlock(t, v, "racer", vol)
			if hookErr != nil {
				t.Fatalf("racing %s: %v", tc.name, hookErr)
			}
			wantRefusal(t, code, body, tc.reason)
			if bytes.Contains(body, []byte("import_blob")) {
				t.Fatalf("the unlock that raced %s carries a blob", tc.name)
			}
		})
	}
}
