package store

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"time"
)

// maxBatch bounds how many queued writes one transaction carries, so that a
// burst cannot hold the write lock (and its callers) for long.
const maxBatch = 256

// errClosed is returned by writes queued after Close.
var errClosed = errors.New("store is closed")

// writeReq is one caller's write, queued for the writer goroutine.
type writeReq struct {
	ctx  context.Context
	fn   func(context.Context, *sql.Tx) error
	done chan writeResult
}

type writeResult struct {
	err   error
	panic any // fn panicked with this value; re-raised in the caller
	read  *readResult
}

// readResult is the read after an append (AppendAuditUsingThenRead).
type readResult struct {
	vm  VM
	vol *Volume
	err error
}

// write runs fn inside a BEGIN IMMEDIATE transaction and returns once that
// transaction is durably committed (or fn's error, with fn's changes undone).
//
// Group commit: the writer goroutine takes every write queued while the
// previous transaction was committing (up to maxBatch) and runs them, in
// queue order, in one transaction, each inside its own SAVEPOINT. A fn that
// fails is rolled back to its savepoint alone; the others stay in the batch.
// Each caller is answered only after the batch's COMMIT has returned (with
// synchronous=FULL, after the WAL's fsync), and if BEGIN, a savepoint or the
// COMMIT fails, every fn in the batch gets that error: nothing it wrote is
// kept, and a caller never sees success for a write that is not durable.
// Because fns in one batch run one after another in one transaction, each
// sees the writes of those before it: read-modify-write stays serial (the
// audit chain cannot fork, a challenge ID is accepted once).
//
// fn must use the context it is given, not the caller's: it carries the
// caller's values without its cancellation, because a statement interrupted
// by a cancelled context would make SQLite abandon the whole batch's
// transaction. A caller whose context is done before its fn runs gets the
// context's error and its fn is skipped; once queued, a caller waits for its
// batch, so that its answer always matches what was committed.
func (s *SQLite) write(ctx context.Context, fn func(context.Context, *sql.Tx) error) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	req := &writeReq{ctx: ctx, fn: fn, done: make(chan writeResult, 1)}
	s.qmu.RLock()
	if s.closed {
		s.qmu.RUnlock()
		return errClosed
	}
	s.queue <- req // blocks only while maxBatch writes wait: the writer is draining them
	s.qmu.RUnlock()
	res := <-req.done
	if res.panic != nil {
		panic(res.panic)
	}
	return res.err
}

func (s *SQLite) startWriter() {
	s.queue = make(chan *writeReq, maxBatch)
	s.stop = make(chan struct{})
	s.stopped = make(chan struct{})
	s.ckptDone = make(chan struct{})
	go s.writer()
	go s.checkpointer()
}

// stopWriter refuses new writes (errClosed), lets the writer finish those
// already queued, and waits for it and the checkpointer to end.
func (s *SQLite) stopWriter() {
	s.qmu.Lock()
	if !s.closed {
		s.closed = true
		close(s.stop)
	}
	s.qmu.Unlock()
	<-s.stopped
	<-s.ckptDone
}

func (s *SQLite) writer() {
	defer close(s.stopped)
	delay := time.NewTimer(time.Hour)
	delay.Stop()
	batch := make([]*writeReq, 0, maxBatch)
	for {
		var r *writeReq
		select {
		case r = <-s.queue:
		case <-s.stop:
			// No write is queued after stop closes (see write): finish
			// those already queued, then end.
			select {
			case r = <-s.queue:
			default:
				return
			}
		}
		batch = append(batch[:0], r)
	drain:
		for len(batch) < maxBatch {
			select {
			case r := <-s.queue:
				batch = append(batch, r)
			default:
				break drain
			}
		}
		if cd := s.commit.Load(); cd != nil && cd.siblings() > len(batch) {
			batch = linger(cd, s.queue, batch, delay)
		}
		s.commitBatch(batch)
		clear(batch) // drop references to answered requests
	}
}

// DefaultCommitDelay is how long the writer waits for the writes of
// sibling transactions before committing a batch (see SetCommitDelay).
const DefaultCommitDelay = 2 * time.Millisecond

type commitDelay struct {
	d        time.Duration
	siblings func() int
}

// SetCommitDelay sets the group commit's delay, as PostgreSQL's
// commit_delay and commit_siblings do: when siblings reports more
// operations under way than the batch holds writes (other callers will
// write soon, such as unlocks still verifying their quotes), the writer
// waits d for more writes before committing (or until the batch is full),
// so that they share one COMMIT and its fsync. A lone caller, or one writing again and again, never
// waits. Under load this trades up to d of latency for much less CPU per
// write (the COMMIT, its WAL frame writes and the fsync are most of a
// write's cost), which leaves more CPU to the requests queued behind. d = 0
// or siblings = nil turns it off (the default).
func (s *SQLite) SetCommitDelay(d time.Duration, siblings func() int) {
	if d <= 0 || siblings == nil {
		s.commit.Store(nil)
		return
	}
	s.commit.Store(&commitDelay{d: d, siblings: siblings})
}

// linger adds to batch the writes that arrive on queue within the commit
// delay, up to maxBatch. It does not stop when the batch holds as many
// writes as there are siblings: measured at 1500 unlocks/s, committing
// that early made more, smaller commits, for more CPU per unlock and a
// longer tail.
func linger[R any](cd *commitDelay, queue <-chan R, batch []R, t *time.Timer) []R {
	t.Reset(cd.d)
	defer t.Stop()
	for len(batch) < maxBatch {
		select {
		case r := <-queue:
			batch = append(batch, r)
		case <-t.C:
			return batch
		}
	}
	return batch
}

// checkpointEvery is how often the checkpointer copies the WAL into the
// database.
const checkpointEvery = 250 * time.Millisecond

// checkpointer copies committed WAL frames into the database file from its
// own connection, in PASSIVE mode, until the store closes. The connections
// run with wal_autocheckpoint(0): otherwise the commit that crosses the
// 1000-page mark runs the checkpoint (and its fsync of the database file)
// itself, stalling the whole batch waiting on it. A PASSIVE checkpoint
// never blocks the writer; SQLite restarts the WAL from its start once a
// checkpoint has copied all of it. Every process that opens the store (the
// service, a keysvc CLI command) runs its own checkpointer while open, and
// SQLite checkpoints once more when the last connection closes.
func (s *SQLite) checkpointer() {
	defer close(s.ckptDone)
	t := time.NewTicker(checkpointEvery)
	defer t.Stop()
	for {
		select {
		case <-s.stop:
			return
		case <-t.C:
			s.db.ExecContext(context.Background(), `PRAGMA wal_checkpoint(PASSIVE)`)
		}
	}
}

// commitBatch runs batch in one transaction and answers every request.
func (s *SQLite) commitBatch(batch []*writeReq) {
	s.wmu.Lock()
	defer s.wmu.Unlock()
	results := make([]writeResult, len(batch))
	answer := func() {
		for i, r := range batch {
			r.done <- results[i]
		}
	}
	// failAll replaces every result that claimed success (or none) with
	// err: the batch's writes are gone, so no caller may report them done.
	failAll := func(err error) {
		for i := range results {
			if results[i].err == nil && results[i].panic == nil {
				results[i].err = err
			}
		}
		answer()
	}
	ctx := context.Background()
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		failAll(fmt.Errorf("begin write: %w", err))
		return
	}
	for i, r := range batch {
		if err := r.ctx.Err(); err != nil {
			results[i].err = err
			continue
		}
		if _, err := s.txExec(ctx, tx, `SAVEPOINT w`); err != nil {
			tx.Rollback()
			failAll(fmt.Errorf("begin write: savepoint: %w", err))
			return
		}
		results[i] = runFn(r, tx)
		if results[i].err != nil || results[i].panic != nil {
			// Undo this fn alone. If SQLite already rolled the whole
			// transaction back (I/O error, disk full), the savepoint is gone
			// and so is every earlier fn's work: fail them all.
			if _, err := s.txExec(ctx, tx, `ROLLBACK TO w`); err != nil {
				tx.Rollback()
				failAll(fmt.Errorf("write abandoned: roll back a failed write: %w", err))
				return
			}
		}
		if _, err := s.txExec(ctx, tx, `RELEASE w`); err != nil {
			tx.Rollback()
			failAll(fmt.Errorf("write abandoned: release savepoint: %w", err))
			return
		}
	}
	if s.failCommit != nil {
		if err := s.failCommit(len(batch)); err != nil {
			tx.Rollback()
			failAll(fmt.Errorf("commit: %w", err))
			return
		}
	}
	if err := tx.Commit(); err != nil {
		failAll(fmt.Errorf("commit: %w", err))
		return
	}
	answer()
}

// runFn runs r.fn, turning a panic into a result the caller re-raises.
func runFn(r *writeReq, tx *sql.Tx) (res writeResult) {
	defer func() {
		if p := recover(); p != nil {
			res = writeResult{panic: p}
		}
	}()
	return writeResult{err: r.fn(context.WithoutCancel(r.ctx), tx)}
}
