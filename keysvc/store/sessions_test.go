package store_test

import (
	"bytes"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/keygate/keygate/keysvc/store"
)

// TestServiceKeys: the first claim stores its bytes, later ones get them
// back, and a rekey replaces them.
func TestServiceKeys(t *testing.T) { each(t, testServiceKeys) }

func testServiceKeys(t *testing.T, s store.Backend) {
	ctx := t.Context()
	got, err := s.ClaimServiceKey(ctx, "k", []byte("first"))
	if err != nil || string(got) != "first" {
		t.Fatalf("first claim: %q %v", got, err)
	}
	if got, err = s.ClaimServiceKey(ctx, "k", []byte("second")); err != nil || string(got) != "first" {
		t.Fatalf("second claim: %q %v, want the first bytes", got, err)
	}
	if _, err := s.RekeyServiceKeys(ctx, func(string, []byte) ([]byte, error) { return nil, errors.New("no") }); err == nil {
		t.Fatal("a failing rekey reported success")
	}
	n, err := s.RekeyServiceKeys(ctx, func(name string, b []byte) ([]byte, error) { return append([]byte("re-"), b...), nil })
	if err != nil || n != 1 {
		t.Fatalf("rekey: %d %v", n, err)
	}
	if got, _ = s.ClaimServiceKey(ctx, "k", []byte("third")); string(got) != "re-first" {
		t.Fatalf("after rekey: %q, want re-first", got)
	}
}

// TestReattestSessions: a session's life in the store: seen, stale,
// seen again, locked (and then left alone by a good re-attestation), and
// forgotten.
func TestReattestSessions(t *testing.T) { each(t, testReattestSessions) }

func testReattestSessions(t *testing.T, s store.Backend) {
	ctx := t.Context()
	t0 := time.Unix(1_700_000_000, 0).UTC()
	seen := func(id string, at time.Time) (store.ReattestSession, error) {
		return s.ReattestSeen(ctx, store.ReattestSession{ID: id, VM: "vm", Volume: "vol", Interval: time.Minute, Last: at, Due: at.Add(2 * time.Minute), MAC: []byte("mac-" + id)})
	}
	if _, err := seen("a", t0); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("first seen: %v, want ErrNotFound (no row before)", err)
	}
	if _, err := seen("b", t0.Add(time.Hour)); !errors.Is(err, store.ErrNotFound) {
		t.Fatal(err)
	}
	if got, err := s.ClaimStaleSessions(ctx, t0.Add(time.Minute), 10); err != nil || len(got) != 0 {
		t.Fatalf("claim before due: %v %v", got, err)
	}
	got, err := s.ClaimStaleSessions(ctx, t0.Add(3*time.Minute), 10)
	if err != nil || len(got) != 1 || got[0].ID != "a" || !got[0].Last.Equal(t0) || got[0].Interval != time.Minute || !bytes.Equal(got[0].MAC, []byte("mac-a")) {
		t.Fatalf("claim past due: %+v %v, want a", got, err)
	}
	if got, _ := s.ClaimStaleSessions(ctx, t0.Add(3*time.Minute), 10); len(got) != 0 {
		t.Fatalf("claimed twice: %+v", got)
	}
	if n, err := s.CountStaleSessions(ctx); err != nil || n != 1 {
		t.Fatalf("stale count %d %v, want 1", n, err)
	}
	prev, err := seen("a", t0.Add(4*time.Minute))
	if err != nil || prev.Stale.IsZero() {
		t.Fatalf("seen after stale: %+v %v, want the stale row before", prev, err)
	}
	if n, _ := s.CountStaleSessions(ctx); n != 0 {
		t.Fatalf("stale count %d after a re-attestation, want 0", n)
	}
	lockAt := t0.Add(5 * time.Minute)
	if err := s.LockSession(ctx, store.ReattestSession{ID: "a", VM: "vm", Volume: "vol", Locked: lockAt, MAC: []byte("locked")}); err != nil {
		t.Fatal(err)
	}
	if err := s.LockSession(ctx, store.ReattestSession{ID: "a", VM: "vm", Volume: "vol", Locked: lockAt.Add(time.Hour), MAC: []byte("later")}); err != nil {
		t.Fatal(err)
	}
	if prev, err := seen("a", t0.Add(6*time.Minute)); err != nil || !prev.IsLocked() {
		t.Fatalf("seen after lock: %+v %v, want the locked row", prev, err)
	}
	r, err := s.GetReattestSession(ctx, "a")
	if err != nil || !r.Locked.Equal(lockAt) || string(r.MAC) != "locked" || !r.Last.Equal(t0.Add(4*time.Minute)) {
		t.Fatalf("locked row %+v %v: want the first lock kept and no later re-attestation recorded", r, err)
	}
	if got, _ := s.ClaimStaleSessions(ctx, t0.Add(24*time.Hour), 10); len(got) != 1 || got[0].ID != "b" {
		t.Fatalf("claim much later: %+v, want b alone (a is locked)", got)
	}
	// A lock of a session never seen inserts its row.
	if err := s.LockSession(ctx, store.ReattestSession{ID: "c", VM: "vm", Volume: "vol", Locked: t0, MAC: []byte("c")}); err != nil {
		t.Fatal(err)
	}
	if r, err := s.GetReattestSession(ctx, "c"); err != nil || !r.IsLocked() {
		t.Fatalf("lock without a row: %+v %v", r, err)
	}
	if err := s.EndSession(ctx, "c"); err != nil {
		t.Fatal(err)
	}
	if _, err := s.GetReattestSession(ctx, "c"); err != nil {
		t.Fatalf("EndSession removed a locked session: %v", err)
	}
	n, err := s.ForgetSessions(ctx, t0.Add(time.Minute))
	if err != nil || n != 1 {
		t.Fatalf("forget before t0+1m: %d %v, want c alone", n, err)
	}
	if n, err = s.ForgetSessions(ctx, t0.Add(48*time.Hour)); err != nil || n != 2 {
		t.Fatalf("forget later: %d %v, want a and b", n, err)
	}
	if _, err := s.GetReattestSession(ctx, "a"); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("forgotten session: %v", err)
	}
}

// TestStaleClaimedOnce: two stores on one database (two replicas) claiming
// at once flag each stale session once.
func TestStaleClaimedOnce(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b backend) {
		s1, s2 := b.open(t), b.open(t)
		ctx := t.Context()
		t0 := time.Unix(1_700_000_000, 0).UTC()
		const n = 200
		for i := range n {
			if _, err := s1.ReattestSeen(ctx, store.ReattestSession{ID: fmt.Sprint("s", i), VM: "vm", Volume: "vol", Interval: time.Second, Last: t0, Due: t0, MAC: []byte{1}}); !errors.Is(err, store.ErrNotFound) {
				t.Fatal(err)
			}
		}
		var (
			mu   sync.Mutex
			seen = map[string]int{}
			wg   sync.WaitGroup
		)
		for _, s := range []store.Backend{s1, s2, s1, s2} {
			wg.Go(func() {
				for {
					got, err := s.ClaimStaleSessions(ctx, t0.Add(time.Second), 7)
					if err != nil {
						t.Error(err)
						return
					}
					if len(got) == 0 {
						return
					}
					mu.Lock()
					for _, r := range got {
						seen[r.ID]++
					}
					mu.Unlock()
				}
			})
		}
		wg.Wait()
		if len(seen) != n {
			t.Fatalf("%d sessions claimed, want %d", len(seen), n)
		}
		for id, k := range seen {
			if k != 1 {
				t.Fatalf("session %s claimed %d times", id, k)
			}
		}
	})
}
