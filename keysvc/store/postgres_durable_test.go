package store_test

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/keygate/keygate/internal/pgtest"
	"github.com/keygate/keygate/keysvc/store"
)

// TestAuditAnsweredOnlyWhenDurable: the audit writer commits its batches
// without waiting for the disk, so that the head's lock is not held through
// the fsync, and then waits for the WAL itself. With the synchronous
// standby stopped, no commit can become durable: an append must not be
// answered as done, and ScanAudit must not show the record that append
// made visible on the primary (a reader could otherwise see a record that
// a failover takes back, and later a different record under its seq). Once
// the standby is back, the same store appends and scans again, on one
// unforked chain.
func TestAuditAnsweredOnlyWhenDurable(t *testing.T) {
	primary := pgtest.New(t, pgtest.Options{Conf: pgtest.SyncReplication})
	standby := primary.Standby(t)
	if err := primary.Exec("postgres", "CREATE DATABASE keysvc"); err != nil {
		t.Fatal(err)
	}
	s := backend{name: "postgres", url: primary.URL("keysvc")}.open(t)
	bg := context.Background()
	exp := time.Now().Add(time.Hour)
	if err := s.AppendAuditUsing(bg, store.ChallengeUse{ID: "before", Expires: exp}, chained("u")); err != nil {
		t.Fatal(err)
	}
	if err := standby.Stop("immediate"); err != nil {
		t.Fatal(err)
	}
	seen := 0
	for _, tc := range []struct {
		name string
		call func(context.Context) error
	}{
		{"AppendAuditUsing", func(ctx context.Context) error {
			return s.AppendAuditUsing(ctx, store.ChallengeUse{ID: "during", Expires: exp}, chained("u"))
		}},
		{"AppendAuditUsingThenRead", func(ctx context.Context) error {
			_, _, err := s.AppendAuditUsingThenRead(ctx, store.ChallengeUse{ID: "during-2", Expires: exp}, chained("u"), "vm", "vol")
			return err
		}},
		{"ScanAudit", func(ctx context.Context) error {
			_, err := s.ScanAudit(ctx, 0, func(store.AuditRecord) error { seen++; return nil })
			return err
		}},
	} {
		ctx, cancel := context.WithTimeout(bg, 3*time.Second)
		err := tc.call(ctx)
		cancel()
		if err == nil {
			t.Errorf("%s answered while the synchronous standby was down: nothing it did is durable yet", tc.name)
		} else if !errors.Is(err, store.ErrUnavailable) && !errors.Is(err, context.DeadlineExceeded) {
			t.Errorf("%s with the standby down: %v, want ErrUnavailable or the deadline", tc.name, err)
		}
	}
	if seen != 0 {
		t.Errorf("ScanAudit showed %d records while the standby was down, want none", seen)
	}
	if err := standby.Start(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(bg, 60*time.Second)
	defer cancel()
	if err := s.AppendAuditUsing(ctx, store.ChallengeUse{ID: "after", Expires: exp}, chained("u")); err != nil {
		t.Fatalf("append once the standby is back: %v", err)
	}
	var recs []store.AuditRecord
	head, err := s.ScanAudit(ctx, 0, func(r store.AuditRecord) error { recs = append(recs, r); return nil })
	if err != nil {
		t.Fatalf("scan once the standby is back: %v", err)
	}
	// The appends that were not answered may have committed: 2 to 4
	// records, one chain.
	if len(recs) < 2 || head == nil || head.Seq != recs[len(recs)-1].Seq {
		t.Fatalf("after the outage: %d records, head %+v; want the first and last appends and a head on the last", len(recs), head)
	}
	for i, r := range recs {
		if r.Seq != uint64(i+1) || i > 0 && string(r.PrevHash) != string(recs[i-1].Hash) {
			t.Fatalf("record %d: seq %d, prev %q; want seq %d on %q", i, r.Seq, r.PrevHash, i+1, recs[max(i-1, 0)].Hash)
		}
	}
}

// TestScanAuditConcurrent: ScanAudit holds its snapshot's connection while
// it takes a second for the flush; scans started together, more than the
// pool has connections, must all finish rather than each wait for a
// connection another holds.
func TestScanAuditConcurrent(t *testing.T) {
	s := backend{name: "postgres", url: replicasURL(t)}.open(t)
	bg := context.Background()
	if err := s.AppendAudit(bg, chained("u")); err != nil {
		t.Fatal(err)
	}
	const scans = 24 // three times the default pool
	errs := make(chan error, scans)
	start := make(chan struct{})
	for range scans {
		go func() {
			<-start
			ctx, cancel := context.WithTimeout(bg, 30*time.Second)
			defer cancel()
			n := 0
			_, err := s.ScanAudit(ctx, 0, func(store.AuditRecord) error { n++; return nil })
			if err == nil && n != 1 {
				err = fmt.Errorf("%d records, want 1", n)
			}
			errs <- err
		}()
	}
	close(start)
	for range scans {
		if err := <-errs; err != nil {
			t.Errorf("concurrent scan: %v", err)
		}
	}
}
