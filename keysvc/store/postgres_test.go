package store_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/keygate/keygate/internal/pgtest"
	"github.com/keygate/keygate/keysvc/store"
)

// replicas opens two stores on one fresh PostgreSQL database, as two key
// service replicas would: each has its own pool and its own audit writer.
func replicas(t *testing.T) (a, b store.Backend, url string) {
	t.Helper()
	url = replicasURL(t)
	be := backend{name: "postgres", url: url}
	return be.open(t), be.open(t), url
}

// replicasURL is a fresh PostgreSQL database for stores that play replicas.
func replicasURL(t *testing.T) string { return pgtest.Shared(t).NewDB(t) }

// chained appends a record whose PrevHash is the last record's Hash, as
// package audit does: a fork shows as two records with one PrevHash.
func chained(tag string) store.AuditNext {
	return func(last *store.AuditRecord, head *store.AuditHead) (store.AuditRecord, store.AuditHead, error) {
		seq, prev := uint64(1), []byte("genesis")
		if last != nil {
			seq, prev = last.Seq+1, last.Hash
		}
		if (last == nil) != (head == nil) || last != nil && head.Seq != last.Seq {
			return store.AuditRecord{}, store.AuditHead{}, fmt.Errorf("last %v and head %v disagree", last, head)
		}
		h := []byte(fmt.Sprintf("%s-%d", tag, seq))
		return store.AuditRecord{Seq: seq, Time: time.Unix(0, int64(seq)).UTC(), Actor: tag, Action: "x", Subject: "s",
				Details: []byte(`{}`), PrevHash: prev, Hash: h, MAC: []byte("m")},
			store.AuditHead{Seq: seq, Hash: h, MAC: []byte("hm")}, nil
	}
}

// TestReplicasShareGuarantees: two stores on one database keep the
// guarantees the package documents across processes: no lost update, a
// challenge released once, one unforked audit chain.
func TestReplicasShareGuarantees(t *testing.T) {
	ctx := context.Background()
	a, b, _ := replicas(t)
	if _, err := a.CreateVM(ctx, store.VM{Name: "web-1", EKPubPEM: "x", Policy: []byte(`{"n":0}`)}); err != nil {
		t.Fatal(err)
	}
	stores := []store.Backend{a, b}
	const workers, each = 8, 15
	var (
		wg                 sync.WaitGroup
		mu                 sync.Mutex
		winners, auditWins int
	)
	for w := range workers {
		s := stores[w%2]
		wg.Go(func() {
			for i := range each {
				_, err := s.UpdateVM(ctx, "web-1", func(v *store.VM) error {
					var n int
					fmt.Sscanf(string(v.Policy), `{"n":%d}`, &n)
					v.Policy = []byte(fmt.Sprintf(`{"n":%d}`, n+1))
					return nil
				})
				if err != nil {
					t.Error(err)
				}
				if err := s.AppendAudit(ctx, chained(fmt.Sprintf("w%d.%d", w, i))); err != nil {
					t.Error(err)
				}
			}
			// One challenge redeemed at both replicas at once, through
			// both paths that record a use.
			if err := s.UseChallenge(ctx, "shared", time.Now().Add(time.Minute)); err == nil {
				mu.Lock()
				winners++
				mu.Unlock()
			} else if !errors.Is(err, store.ErrChallengeUsed) {
				t.Error(err)
			}
			if err := s.AppendAuditUsing(ctx, store.ChallengeUse{ID: "shared-unlock", Expires: time.Now().Add(time.Minute)}, chained("unlock")); err == nil {
				mu.Lock()
				auditWins++
				mu.Unlock()
			} else if !errors.Is(err, store.ErrChallengeUsed) {
				t.Error(err)
			}
		})
	}
	wg.Wait()
	v, err := b.GetVM(ctx, "web-1")
	if err != nil {
		t.Fatal(err)
	}
	if want := fmt.Sprintf(`{"n":%d}`, workers*each); string(v.Policy) != want {
		t.Errorf("policy %s after concurrent updates from two stores, want %s (lost updates)", v.Policy, want)
	}
	if winners != 1 || auditWins != 1 {
		t.Errorf("shared challenge accepted %d times by UseChallenge and %d by AppendAuditUsing, want once each", winners, auditWins)
	}
	var (
		prev  []byte
		n     int
		seen  = map[string]bool{}
		unlck int
	)
	head, err := a.ScanAudit(ctx, 1, func(r store.AuditRecord) error {
		n++
		if r.Seq != uint64(n) {
			return fmt.Errorf("record %d has seq %d", n, r.Seq)
		}
		if prev != nil && !bytes.Equal(r.PrevHash, prev) || seen[string(r.PrevHash)] {
			return fmt.Errorf("record %d follows %q, not the record before it (%q): the chain forked", r.Seq, r.PrevHash, prev)
		}
		seen[string(r.PrevHash)], prev = true, r.Hash
		if r.Actor == "unlock" {
			unlck++
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if want := workers*each + 1; n != want || unlck != 1 || head == nil || head.Seq != uint64(want) || !bytes.Equal(head.Hash, prev) {
		t.Errorf("chain of %d records (%d unlocks), head %+v; want %d records, one unlock, head on the last", n, unlck, head, want)
	}
}

// TestReplicasAdoptOnce: two replicas adopting an unanchored store at once:
// one adopts, the other gets ErrExists and finds the anchor.
func TestReplicasAdoptOnce(t *testing.T) {
	ctx := context.Background()
	a, b, _ := replicas(t)
	anchor := func(r store.AuditRecord) store.Anchor {
		return store.Anchor{Created: time.Unix(1, 0).UTC(), GenesisSeq: r.Seq, GenesisHash: r.Hash, MAC: []byte("a")}
	}
	keep := func(*store.VM) error { return nil }
	keepVol := func(*store.Volume) error { return nil }
	errs := make(chan error, 2)
	for _, s := range []store.Backend{a, b} {
		go func() { errs <- s.Adopt(ctx, keep, keepVol, chained("genesis"), anchor) }()
	}
	e1, e2 := <-errs, <-errs
	if (e1 == nil) == (e2 == nil) || !errors.Is(errors.Join(e1, e2), store.ErrExists) {
		t.Fatalf("Adopt at both: %v and %v; want one success and one ErrExists", e1, e2)
	}
	if an, err := b.Anchor(ctx); err != nil || an == nil || an.GenesisSeq != 1 {
		t.Fatalf("anchor %+v (%v)", an, err)
	}
}

// TestPostgresMigrations: the schema is applied once however many replicas
// open the database, and a database from a newer keysvc is refused.
func TestPostgresMigrations(t *testing.T) {
	ctx := context.Background()
	url := pgtest.Shared(t).NewDB(t)
	be := backend{name: "postgres", url: url}
	errs := make(chan error, 3)
	for range 3 {
		go func() {
			s, err := store.OpenPostgres(ctx, url)
			if err == nil {
				s.Close()
			}
			errs <- err
		}()
	}
	for range 3 {
		if err := <-errs; err != nil {
			t.Fatalf("replicas opening a new database together: %v", err)
		}
	}
	if err := be.open(t).Ready(ctx); err != nil {
		t.Fatalf("Ready: %v", err)
	}
	if err := be.exec(t, `INSERT INTO schema_migrations VALUES (999, '0999_future.sql', 0)`); err != nil {
		t.Fatal(err)
	}
	_, err := store.OpenPostgres(ctx, url)
	if !errors.Is(err, store.ErrNewerSchema) || !strings.Contains(err.Error(), "999") {
		t.Fatalf("open a database from the future: %v, want ErrNewerSchema naming 999", err)
	}
}

// TestPostgresBadURL: a URL that does not parse is refused without echoing
// it (it may hold a password), and an unreachable server is ErrUnavailable.
func TestPostgresBadURL(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	_, err := store.OpenPostgres(ctx, "postgres://u:s3cret@host:notaport/db")
	if err == nil || strings.Contains(err.Error(), "s3cret") {
		t.Fatalf("bad URL: %v; want an error without the password", err)
	}
	_, err = store.OpenPostgres(ctx, "postgres://postgres:s3cret@/db?host="+t.TempDir())
	if !errors.Is(err, store.ErrUnavailable) || strings.Contains(err.Error(), "s3cret") {
		t.Fatalf("no server: %v; want ErrUnavailable without the password", err)
	}
}

// TestAppendAuditUsingPerEngine: a replay appends nothing and a failed
// append leaves the challenge unused, on both engines.
func TestAppendAuditUsingPerEngine(t *testing.T) {
	each(t, func(t *testing.T, s store.Backend) {
		ctx := context.Background()
		exp := time.Now().Add(time.Hour)
		boom := errors.New("boom")
		failing := func(*store.AuditRecord, *store.AuditHead) (store.AuditRecord, store.AuditHead, error) {
			return store.AuditRecord{}, store.AuditHead{}, boom
		}
		count := func() int {
			n := 0
			if _, err := s.ScanAudit(ctx, 0, func(store.AuditRecord) error { n++; return nil }); err != nil {
				t.Fatal(err)
			}
			return n
		}
		if err := s.AppendAuditUsing(ctx, store.ChallengeUse{ID: "c", Expires: exp}, chained("u")); err != nil {
			t.Fatal(err)
		}
		if err := s.AppendAuditUsing(ctx, store.ChallengeUse{ID: "c", Expires: exp}, chained("u")); !errors.Is(err, store.ErrChallengeUsed) {
			t.Fatalf("replay: %v, want ErrChallengeUsed", err)
		}
		if err := s.AppendAuditUsing(ctx, store.ChallengeUse{ID: "d", Expires: exp}, failing); !errors.Is(err, boom) {
			t.Fatalf("failing append: %v, want boom", err)
		}
		if used, _ := s.ChallengeUsed(ctx, "d"); used || count() != 1 {
			t.Fatalf("after a replay and a failed append: challenge d used=%v, %d records; want unused, 1", used, count())
		}
	})
}

// TestPostgresUnavailable: with the server stopped under an open store,
// every kind of call fails with ErrUnavailable (the key service's 503)
// within its deadline, and the same store works again once the server is
// back, without being reopened.
func TestPostgresUnavailable(t *testing.T) {
	pg := pgtest.New(t, pgtest.Options{})
	s := backend{name: "postgres", url: pg.NewDB(t)}.open(t)
	bg := context.Background()
	if _, err := s.CreateVM(bg, store.VM{Name: "web-1", EKPubPEM: "x"}); err != nil {
		t.Fatal(err)
	}
	if err := pg.Stop("immediate"); err != nil {
		t.Fatal(err)
	}
	calls := map[string]func(context.Context) error{
		"GetVM": func(ctx context.Context) error { _, err := s.GetVM(ctx, "web-1"); return err },
		"GetVMAndVolume": func(ctx context.Context) error {
			_, _, err := s.GetVMAndVolume(ctx, "web-1", "v")
			return err
		},
		"UpdateVM": func(ctx context.Context) error {
			_, err := s.UpdateVM(ctx, "web-1", func(v *store.VM) error { v.Revoked = true; return nil })
			return err
		},
		"AppendAuditUsing": func(ctx context.Context) error {
			return s.AppendAuditUsing(ctx, store.ChallengeUse{ID: "c", Expires: time.Now().Add(time.Hour)}, chained("u"))
		},
		"AddEvents": func(ctx context.Context) error {
			_, err := s.AddEvents(ctx, []store.VMEvent{{Received: time.Now(), VM: "web-1", Kind: "k", Severity: "info", Data: []byte("{}")}})
			return err
		},
		"Ready": s.Ready,
	}
	for name, call := range calls {
		ctx, cancel := context.WithTimeout(bg, 20*time.Second)
		err := call(ctx)
		cancel()
		if !errors.Is(err, store.ErrUnavailable) {
			t.Errorf("%s with the server down: %v, want ErrUnavailable", name, err)
		}
	}
	if err := pg.Start(); err != nil {
		t.Fatal(err)
	}
	for name, call := range calls {
		if name == "UpdateVM" || name == "AppendAuditUsing" || name == "AddEvents" {
			continue // run once below, to check what they wrote
		}
		if err := call(bg); err != nil {
			t.Errorf("%s after the server is back: %v", name, err)
		}
	}
	if err := calls["AppendAuditUsing"](bg); err != nil {
		t.Fatalf("append after the server is back: %v", err)
	}
	if used, err := s.ChallengeUsed(bg, "c"); err != nil || !used {
		t.Fatalf("challenge recorded after the outage: %v %v", used, err)
	}
	if v, err := s.GetVM(bg, "web-1"); err != nil || v.Revoked {
		t.Fatalf("the update refused during the outage was written: %+v %v", v, err)
	}
}
