package store

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// openTemp opens a store in a temporary directory, closed when t ends.
func openTemp(t *testing.T) *SQLite {
	t.Helper()
	s, err := OpenSQLite(context.Background(), t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// appendNext is an AppendAudit step that extends the chain by one record
// (the store does not check hashes; package audit does).
func appendNext(last *AuditRecord, _ *AuditHead) (AuditRecord, AuditHead, error) {
	seq := uint64(1)
	if last != nil {
		seq = last.Seq + 1
	}
	h := []byte(fmt.Sprintf("h%d", seq))
	return AuditRecord{Seq: seq, Time: time.Unix(0, int64(seq)).UTC(), Actor: "t", Action: "unlock", Details: []byte("{}"),
			PrevHash: []byte("p"), Hash: h, MAC: []byte("m")},
		AuditHead{Seq: seq, Hash: h, MAC: []byte("m")}, nil
}

// pauseWriter occupies the writer with a write that waits for the returned
// function to be called, so that the writes issued meanwhile queue up and
// are committed together as the next batch.
func pauseWriter(t *testing.T, s *SQLite) (resume func() error) {
	t.Helper()
	running, release, done := make(chan struct{}), make(chan struct{}), make(chan error, 1)
	go func() {
		done <- s.write(context.Background(), func(context.Context, *sql.Tx) error {
			close(running)
			<-release
			return nil
		})
	}()
	<-running
	return func() error { close(release); return <-done }
}

// waitQueued waits until n writes are queued behind a paused writer.
func waitQueued(s *SQLite, n int) {
	for len(s.queue) < n {
		time.Sleep(time.Millisecond)
	}
}

// TestBatchCommitFailureFailsEveryWaiter checks the group commit's
// durability contract: when a batch's COMMIT fails, every write in it
// (challenge uses and audit appends alike) gets an error, even those whose
// own statements succeeded, and nothing of the batch is stored. The key
// service releases a key only after both its challenge use and its audit
// append succeed, so no key is released for any unlock in such a batch.
func TestBatchCommitFailureFailsEveryWaiter(t *testing.T) {
	ctx := context.Background()
	s := openTemp(t)
	if err := s.AppendAudit(ctx, appendNext); err != nil {
		t.Fatal(err)
	}
	if err := s.UseChallenge(ctx, "used-before", time.Now().Add(time.Hour)); err != nil {
		t.Fatal(err)
	}

	errDisk := errors.New("injected: disk failed during COMMIT")
	var sizes []int // written by the writer goroutine, read after it answered
	s.failCommit = func(n int) error { sizes = append(sizes, n); return errDisk }
	resume := pauseWriter(t, s)

	const n = 24 // challenge uses and audit appends, alternating, plus one replay
	errs := make([]error, n+1)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			if i%2 == 0 {
				errs[i] = s.UseChallenge(ctx, fmt.Sprintf("c%d", i), time.Now().Add(time.Hour))
			} else {
				errs[i] = s.AppendAudit(ctx, appendNext)
			}
		})
	}
	wg.Go(func() { errs[n] = s.UseChallenge(ctx, "used-before", time.Now().Add(time.Hour)) })
	waitQueued(s, n+1)
	if err := resume(); !errors.Is(err, errDisk) {
		t.Errorf("paused write: %v, want the commit failure", err)
	}
	wg.Wait()

	if len(sizes) != 2 || sizes[1] != n+1 {
		t.Fatalf("batch sizes %v, want [1 %d]: the writes were not committed as one batch", sizes, n+1)
	}
	for i, err := range errs[:n] {
		if !errors.Is(err, errDisk) {
			t.Errorf("write %d in the failed batch: %v, want the commit failure", i, err)
		}
	}
	if !errors.Is(errs[n], ErrExists) {
		t.Errorf("replay in the failed batch: %v, want ErrExists", errs[n])
	}

	// Nothing of the batch was kept: the challenges are unused, the chain
	// still ends at record 1.
	s.failCommit = nil
	for i := 0; i < n; i += 2 {
		if err := s.UseChallenge(ctx, fmt.Sprintf("c%d", i), time.Now().Add(time.Hour)); err != nil {
			t.Errorf("challenge c%d after the failed batch: %v (it was stored)", i, err)
		}
	}
	var seqs []uint64
	head, err := s.ScanAudit(ctx, 0, func(r AuditRecord) error { seqs = append(seqs, r.Seq); return nil })
	if err != nil {
		t.Fatal(err)
	}
	if len(seqs) != 1 || head == nil || head.Seq != 1 {
		t.Errorf("audit records %v, head %+v after the failed batch; want only record 1", seqs, head)
	}
}

// TestBatchIsolatesFailures checks that within one batch a failing write is
// undone alone, that later writes see earlier ones (a challenge used twice
// in one batch is refused the second time, appends chain in order), and
// that a panicking write is re-raised in its caller only.
func TestBatchIsolatesFailures(t *testing.T) {
	ctx := context.Background()
	s := openTemp(t)
	var sizes []int
	s.failCommit = func(n int) error { sizes = append(sizes, n); return nil }
	resume := pauseWriter(t, s)

	errOwn := errors.New("this write fails")
	var (
		wg                sync.WaitGroup
		mu                sync.Mutex
		used, replays     int
		appended, panicky int
		failed            error
	)
	const appends = 5
	for range 4 {
		wg.Go(func() {
			err := s.UseChallenge(ctx, "same", time.Now().Add(time.Hour))
			mu.Lock()
			defer mu.Unlock()
			switch {
			case err == nil:
				used++
			case errors.Is(err, ErrExists):
				replays++
			default:
				t.Error(err)
			}
		})
	}
	for range appends {
		wg.Go(func() {
			if err := s.AppendAudit(ctx, appendNext); err != nil {
				t.Error(err)
			}
			mu.Lock()
			appended++
			mu.Unlock()
		})
	}
	wg.Go(func() {
		failed = s.write(ctx, func(ctx context.Context, tx *sql.Tx) error {
			if _, err := tx.ExecContext(ctx, `INSERT INTO used_challenges (id, expires_ns) VALUES ('rolled-back', 0)`); err != nil {
				return err
			}
			return errOwn
		})
	})
	wg.Go(func() {
		defer func() {
			if recover() != nil {
				mu.Lock()
				panicky++
				mu.Unlock()
			}
		}()
		s.write(ctx, func(context.Context, *sql.Tx) error { panic("boom") })
	})
	waitQueued(s, 4+appends+2)
	if err := resume(); err != nil {
		t.Fatal(err)
	}
	wg.Wait()

	if len(sizes) != 2 || sizes[1] != 4+appends+2 {
		t.Fatalf("batch sizes %v, want [1 %d]", sizes, 4+appends+2)
	}
	if used != 1 || replays != 3 {
		t.Errorf("one challenge used 4 times in a batch: %d accepted, %d refused; want 1 and 3", used, replays)
	}
	if !errors.Is(failed, errOwn) {
		t.Errorf("failing write: %v, want its own error", failed)
	}
	if panicky != 1 {
		t.Errorf("panicking write: re-raised %d times, want once", panicky)
	}
	if err := s.UseChallenge(ctx, "rolled-back", time.Now().Add(time.Hour)); err != nil {
		t.Errorf("the failing write's insert was kept: %v", err)
	}
	var seqs []uint64
	head, err := s.ScanAudit(ctx, 0, func(r AuditRecord) error { seqs = append(seqs, r.Seq); return nil })
	if err != nil {
		t.Fatal(err)
	}
	if len(seqs) != appends || seqs[appends-1] != appends || head == nil || head.Seq != appends {
		t.Errorf("audit records %v, head %+v; want 1..%d", seqs, head, appends)
	}
}

// TestWriteAfterClose checks that Close refuses later writes instead of
// leaving them waiting.
func TestWriteAfterClose(t *testing.T) {
	s, err := OpenSQLite(context.Background(), t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	s.Close()
	if err := s.UseChallenge(context.Background(), "x", time.Now()); !errors.Is(err, errClosed) {
		t.Errorf("write after Close: %v, want errClosed", err)
	}
}

// TestAppendAuditUsingBothOrNeither checks that an audit record and the
// challenge use written with it are stored together or not at all: a replay
// appends nothing, and a failed append leaves the challenge unused. The
// cases run in order on one store, each after the ones before it.
func TestAppendAuditUsingBothOrNeither(t *testing.T) {
	ctx := context.Background()
	s := openTemp(t)
	exp := time.Now().Add(time.Hour)
	if err := s.UseChallenge(ctx, "used", exp); err != nil {
		t.Fatal(err)
	}
	errNext := errors.New("next failed")
	failing := func(*AuditRecord, *AuditHead) (AuditRecord, AuditHead, error) {
		return AuditRecord{}, AuditHead{}, errNext
	}
	for _, tc := range []struct {
		name      string
		id        string
		next      func(*AuditRecord, *AuditHead) (AuditRecord, AuditHead, error)
		wantErr   error // nil: success
		appended  bool  // the chain grew by one
		usedAfter bool  // the challenge is recorded as used afterwards
	}{
		{"fresh challenge", "fresh", appendNext, nil, true, true},
		{"same challenge again", "fresh", appendNext, ErrChallengeUsed, false, true},
		{"challenge used by UseChallenge", "used", appendNext, ErrChallengeUsed, false, true},
		{"append fails", "unlucky", failing, errNext, false, false},
		{"empty id", "", appendNext, errAny, false, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := countAudit(t, s)
			err := s.AppendAuditUsing(ctx, ChallengeUse{ID: tc.id, Expires: exp}, tc.next)
			switch {
			case tc.wantErr == nil && err != nil:
				t.Fatalf("append: %v", err)
			case tc.wantErr == errAny && err == nil:
				t.Fatal("append succeeded, want an error")
			case tc.wantErr != nil && tc.wantErr != errAny && !errors.Is(err, tc.wantErr):
				t.Fatalf("append: %v, want %v", err, tc.wantErr)
			}
			if got := countAudit(t, s) - before; got != map[bool]int{true: 1, false: 0}[tc.appended] {
				t.Errorf("the chain grew by %d records", got)
			}
			if tc.id == "" {
				return
			}
			used, err := s.ChallengeUsed(ctx, tc.id)
			if err != nil {
				t.Fatal(err)
			}
			if used != tc.usedAfter {
				t.Errorf("ChallengeUsed(%q) = %v, want %v", tc.id, used, tc.usedAfter)
			}
		})
	}
}

// errAny marks a table case that wants some error, whichever.
var errAny = errors.New("any error")

func countAudit(t *testing.T, s *SQLite) int {
	t.Helper()
	n := 0
	if _, err := s.ScanAudit(context.Background(), 0, func(AuditRecord) error { n++; return nil }); err != nil {
		t.Fatal(err)
	}
	return n
}

// TestCommitDelay checks the group commit's delay, set to an hour so that
// any wait it should not make would hang the test: with no siblings under
// way a write commits at once, and while siblings are under way the batch
// waits for their writes, here until it is full.
func TestCommitDelay(t *testing.T) {
	ctx := context.Background()
	s := openTemp(t)
	var sizes []int // written by the writer goroutine, read after it answered
	s.failCommit = func(n int) error { sizes = append(sizes, n); return nil }
	var siblings atomic.Int64
	s.SetCommitDelay(time.Hour, func() int { return int(siblings.Load()) })
	use := func(id string) {
		if err := s.UseChallenge(ctx, id, time.Now().Add(time.Hour)); err != nil {
			t.Error(err)
		}
	}
	for _, n := range []int{1, 2, 3} {
		// One caller, writing again and again: alone, so never waits.
		siblings.Store(1)
		use(fmt.Sprintf("lone-%d", n))
	}
	// maxBatch operations under way: their writes share one batch.
	siblings.Store(maxBatch)
	var wg sync.WaitGroup
	for i := range maxBatch {
		wg.Go(func() { use(fmt.Sprintf("busy-%d", i)) })
	}
	wg.Wait()
	if want := []int{1, 1, 1, maxBatch}; !slices.Equal(sizes, want) {
		t.Fatalf("batch sizes %v, want %v: lone writes alone, busy ones together", sizes, want)
	}
}

// TestAppendAuditUsingInOneBatch covers the group-commit cases of
// AppendAuditUsing: two uses of one challenge committed in one batch (the
// second sees the first and is refused), and a batch whose COMMIT fails
// (neither the challenge use nor the record is kept).
func TestAppendAuditUsingInOneBatch(t *testing.T) {
	ctx := context.Background()
	exp := time.Now().Add(time.Hour)
	for _, tc := range []struct {
		name      string
		commitErr error
	}{
		{"commit succeeds", nil},
		{"commit fails", errors.New("injected: disk failed during COMMIT")},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := openTemp(t)
			var sizes []int
			s.failCommit = func(n int) error { sizes = append(sizes, n); return tc.commitErr }
			resume := pauseWriter(t, s)
			errs := make([]error, 2)
			var wg sync.WaitGroup
			for i := range errs {
				wg.Go(func() { errs[i] = s.AppendAuditUsing(ctx, ChallengeUse{ID: "twice", Expires: exp}, appendNext) })
			}
			waitQueued(s, 2)
			resume()
			wg.Wait()
			if len(sizes) != 2 || sizes[1] != 2 {
				t.Fatalf("batch sizes %v, want [1 2]: the two uses were not committed as one batch", sizes)
			}
			s.failCommit = nil
			used, err := s.ChallengeUsed(ctx, "twice")
			if err != nil {
				t.Fatal(err)
			}
			if tc.commitErr != nil {
				for i, err := range errs {
					if err == nil {
						t.Errorf("use %d reported success in a batch whose COMMIT failed", i)
					}
				}
				if used || countAudit(t, s) != 0 {
					t.Errorf("after the failed COMMIT: challenge used %v, %d audit records; want neither kept", used, countAudit(t, s))
				}
				return
			}
			ok, replays := 0, 0
			for _, err := range errs {
				switch {
				case err == nil:
					ok++
				case errors.Is(err, ErrChallengeUsed):
					replays++
				default:
					t.Errorf("use: %v", err)
				}
			}
			if ok != 1 || replays != 1 || !used || countAudit(t, s) != 1 {
				t.Errorf("%d stored, %d refused as replays, challenge used %v, %d records; want 1, 1, true, 1", ok, replays, used, countAudit(t, s))
			}
		})
	}
}
