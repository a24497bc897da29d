package store

import (
	"context"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
)

// auditReq is one caller's audit append, queued for the writer.
type auditReq struct {
	ctx  context.Context
	use  *ChallengeUse
	next AuditNext
	read *vmVolumeKey // read after the commit (AppendAuditUsingThenRead)
	done chan writeResult
}

type vmVolumeKey struct{ vm, id string }

func pgAudit(r pgx.Row) (AuditRecord, error) {
	var (
		a       AuditRecord
		seq, tn int64
		details string
	)
	if err := r.Scan(&seq, &tn, &a.Actor, &a.Action, &a.Subject, &details, &a.PrevHash, &a.Hash, &a.MAC); err != nil {
		return AuditRecord{}, err
	}
	a.Seq, a.Time, a.Details = uint64(seq), fromNS(tn), []byte(details)
	return a, nil
}

// The statements of an append, named so that warm and both appenders run
// the same text.
const (
	qLockHead        = `SELECT seq, hash, mac FROM audit_head WHERE id = 1 FOR UPDATE`
	qLastAudit       = `SELECT ` + auditColumns + ` FROM audit_log ORDER BY seq DESC LIMIT 1`
	qClaimChallenges = `INSERT INTO used_challenges (id, expires_ns)
		SELECT * FROM unnest($1::text[], $2::bigint[]) ON CONFLICT (id) DO NOTHING RETURNING id`
	qInsertAudit = `INSERT INTO audit_log (` + auditColumns + `)
		SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::text[], $5::text[], $6::text[], $7::bytea[], $8::bytea[], $9::bytea[])`
	qWriteHead = `UPDATE audit_head SET seq = $1, hash = $2, mac = $3 WHERE id = 1`
	// qAsyncCommit makes the batch's COMMIT return before its WAL is on
	// disk, and qFlush, run in a transaction of its own after it, waits for
	// that WAL (see commitAudit). qFlush's row is its backend's PID modulo
	// 1024, so that the table stays small however many backends come and
	// go; two backends sharing a row at the same instant only wait for
	// each other's flush, which each waits for anyway.
	qAsyncCommit = `SET LOCAL synchronous_commit TO off`
	qFlush       = `INSERT INTO commit_flush (pid) VALUES (pg_backend_pid() % 1024)
		ON CONFLICT (pid) DO UPDATE SET n = commit_flush.n + 1`
)

// scanHead reads the head row qLockHead returns; nil head while the chain
// is empty.
func scanHead(r pgx.Row) (*AuditHead, error) {
	var (
		h   AuditHead
		seq int64
	)
	if err := r.Scan(&seq, &h.Hash, &h.MAC); err != nil {
		return nil, fmt.Errorf("lock audit head: %w (the migration creates its row: was it deleted?)", err)
	}
	if seq == 0 {
		return nil, nil
	}
	h.Seq = uint64(seq)
	return &h, nil
}

// lockHead locks the chain's head row and reads it and the last record.
// Every appender, in every replica, calls it first in its transaction.
func lockHead(ctx context.Context, tx pgx.Tx) (last *AuditRecord, head *AuditHead, err error) {
	if head, err = scanHead(tx.QueryRow(ctx, qLockHead)); err != nil {
		return nil, nil, err
	}
	if last, err = scanLast(tx.QueryRow(ctx, qLastAudit)); err != nil {
		return nil, nil, err
	}
	return last, head, nil
}

// scanLast reads the record qLastAudit returns; nil while the chain is
// empty.
func scanLast(r pgx.Row) (*AuditRecord, error) {
	a, err := pgAudit(r)
	switch {
	case err == nil:
		return &a, nil
	case isNoRowsPG(err):
		return nil, nil
	}
	return nil, fmt.Errorf("read last audit record: %w", err)
}

// insertRecord stores rec (and the challenge use, if any, in the same
// statement: both rows or neither). It returns ErrExists if rec's seq is
// taken and ErrChallengeUsed for a replay; nothing is written then, and
// the transaction stays usable.
func insertRecord(ctx context.Context, tx pgx.Tx, last *AuditRecord, use *ChallengeUse, rec AuditRecord) error {
	if last != nil && rec.Seq <= last.Seq {
		var one int
		err := tx.QueryRow(ctx, `SELECT 1 FROM audit_log WHERE seq = $1`, int64(rec.Seq)).Scan(&one)
		if err == nil {
			return fmt.Errorf("audit record %d: %w", rec.Seq, ErrExists)
		}
		if !isNoRowsPG(err) {
			return err
		}
	}
	args := []any{int64(rec.Seq), ns(rec.Time), rec.Actor, rec.Action, rec.Subject, string(rec.Details), rec.PrevHash, rec.Hash, rec.MAC}
	if use == nil {
		_, err := tx.Exec(ctx, `INSERT INTO audit_log (`+auditColumns+`) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)`, args...)
		return err
	}
	// The challenge row first: when it is there already (a replay, maybe
	// at another replica just now: the insert waits for that transaction
	// and then conflicts), the CTE returns nothing and the record is not
	// inserted either.
	tag, err := tx.Exec(ctx, `WITH used AS (
			INSERT INTO used_challenges (id, expires_ns) VALUES ($10, $11) ON CONFLICT (id) DO NOTHING RETURNING id)
		INSERT INTO audit_log (`+auditColumns+`) SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9 FROM used`,
		append(args, use.ID, ns(use.Expires))...)
	if err == nil && tag.RowsAffected() == 0 {
		return ErrChallengeUsed
	}
	return err
}

func writeHead(ctx context.Context, tx pgx.Tx, h *AuditHead) error {
	if _, err := tx.Exec(ctx, qWriteHead, int64(h.Seq), h.Hash, h.MAC); err != nil {
		return fmt.Errorf("write audit head: %w", err)
	}
	return nil
}

func checkSeq(rec AuditRecord, h AuditHead) error {
	if rec.Seq == 0 || rec.Seq > 1<<63-1 || h.Seq != rec.Seq {
		return fmt.Errorf("audit record seq %d, head seq %d: want equal and in 1..2^63-1", rec.Seq, h.Seq)
	}
	return nil
}

// AppendAudit implements AuditLog.
func (p *Postgres) AppendAudit(ctx context.Context, next func(last *AuditRecord, head *AuditHead) (AuditRecord, AuditHead, error)) error {
	_, err := p.appendAudit(ctx, nil, next, nil)
	return err
}

// AppendAuditUsing implements AuditLog.
func (p *Postgres) AppendAuditUsing(ctx context.Context, use ChallengeUse, next func(last *AuditRecord, head *AuditHead) (AuditRecord, AuditHead, error)) error {
	if use.ID == "" {
		return fmt.Errorf("append audit: use challenge: empty id")
	}
	_, err := p.appendAudit(ctx, &use, next, nil)
	return err
}

// AppendAuditUsingThenRead implements Backend: the read is one statement
// for the whole batch, in the commit's round trip, after the COMMIT.
func (p *Postgres) AppendAuditUsingThenRead(ctx context.Context, use ChallengeUse, next AuditNext, vm, id string) (VM, *Volume, error) {
	if use.ID == "" {
		return VM{}, nil, fmt.Errorf("append audit: use challenge: empty id")
	}
	rr, err := p.appendAudit(ctx, &use, next, &vmVolumeKey{vm, id})
	if err != nil {
		return VM{}, nil, err
	}
	if rr == nil { // the writer always answers a read it was asked for
		return VM{}, nil, fmt.Errorf("%w: no read was made", ErrReadAfterAppend)
	}
	if rr.err != nil {
		return VM{}, nil, fmt.Errorf("%w: %w", ErrReadAfterAppend, rr.err)
	}
	return rr.vm, rr.vol, nil
}

// appendAudit queues the append for the writer and waits for its batch's
// commit, or for ctx's end: then the caller is told the database did not
// answer in time, and the append may still commit (an unlock that gives up
// this way has released nothing; its challenge may be spent).
func (p *Postgres) appendAudit(ctx context.Context, use *ChallengeUse, next AuditNext, read *vmVolumeKey) (*readResult, error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("append audit: %w", err)
	}
	req := &auditReq{ctx: ctx, use: use, next: next, read: read, done: make(chan writeResult, 1)}
	p.qmu.RLock()
	if p.closed {
		p.qmu.RUnlock()
		return nil, fmt.Errorf("append audit: %w", errClosed)
	}
	p.queue <- req
	p.qmu.RUnlock()
	select {
	case res := <-req.done:
		if res.panic != nil {
			panic(res.panic)
		}
		if res.err != nil {
			return nil, fmt.Errorf("append audit: %w", res.err)
		}
		return res.read, nil
	case <-ctx.Done():
		return nil, fmt.Errorf("append audit: %w: no commit before the request's deadline (it may still commit): %w", ErrUnavailable, ctx.Err())
	}
}

// writer runs the queued appends in batches until Close.
func (p *Postgres) writer() {
	defer close(p.stopped)
	delay := time.NewTimer(time.Hour)
	delay.Stop()
	batch := make([]*auditReq, 0, maxBatch)
	for {
		var r *auditReq
		select {
		case r = <-p.queue:
		case <-p.stop:
			select {
			case r = <-p.queue:
			default:
				return
			}
		}
		batch = append(batch[:0], r)
	drain:
		for len(batch) < maxBatch {
			select {
			case r := <-p.queue:
				batch = append(batch, r)
			default:
				break drain
			}
		}
		if cd := p.commit.Load(); cd != nil && cd.siblings() > len(batch) {
			batch = linger(cd, p.queue, batch, delay)
		}
		p.commitAudit(batch)
		clear(batch)
	}
}

// commitAudit runs batch in one transaction under one lock of the head and
// answers every request. The batch costs two round trips, whatever its
// size: the first (BEGIN, the head's lock, the last record, and its
// challenges claimed in one INSERT … ON CONFLICT DO NOTHING) is sent as one
// pipeline, its records are computed in memory one after another (each on
// the one before), and the second pipeline stores them with one INSERT,
// moves the head and commits (and, after the COMMIT, re-reads the VMs and
// volumes the appends asked for). Sent one statement at a time, a batch
// took eight round trips, each a wake-up of the backend and of the writer
// (batches hold about two appends at 1,000 unlocks/s over two replicas),
// and the head stayed locked across all of them while the other replicas'
// writers waited.
//
// The head stays locked from the first pipeline until the batch's COMMIT,
// and a COMMIT that waits for the disk (and, with synchronous replication,
// for the standby) held it through that wait too: the other replicas'
// writers queued behind each fsync, and at 1,000 unlocks/s over two
// replicas the head's lock waits reached 30 ms at p99. So the batch
// commits with synchronous_commit off (qAsyncCommit), which releases the
// lock as soon as the commit record is written, and then, before any
// append is answered, runs a transaction of its own that updates a row
// (qFlush) and commits synchronously: WAL is flushed and replicated in
// order, so its commit waits until the batch's commit record is durable
// too. Nothing is acknowledged that a crash or failover could lose. What
// changes is that other sessions can see the batch before it is durable:
// the next append builds on it (and is answered only after its own, later
// flush), a replay of one of its challenges is refused, and ScanAudit,
// which shows records to the outside, flushes before it reads.
//
// An append whose next fails, or whose seq or challenge is taken, writes
// nothing (a challenge it had claimed is released again in the same
// transaction) and gets its error; the others are kept. If anything else
// fails (the connection, the COMMIT), every append in the batch gets that
// error: none is reported done unless committed.
func (p *Postgres) commitAudit(batch []*auditReq) {
	results := make([]writeResult, len(batch))
	err := func() error {
		ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
		defer cancel()
		conn, err := p.pool.Acquire(ctx)
		if err != nil {
			return fmt.Errorf("begin: %w", err)
		}
		defer conn.Release()
		committed := false
		defer func() {
			// The transaction is explicit (BEGIN is sent in the first
			// pipeline): end it. A connection this leaves inside it (the
			// ROLLBACK failed too) is closed by the pool on release.
			if !committed {
				conn.Exec(ctx, "ROLLBACK")
			}
		}()
		var (
			ids  []string
			exps []int64
		)
		for i, r := range batch {
			if err := r.ctx.Err(); err != nil {
				results[i].err = err
			} else if r.use != nil {
				ids, exps = append(ids, r.use.ID), append(exps, ns(r.use.Expires))
			}
		}
		last, head, claimed, err := lockAndClaim(ctx, conn.Conn(), ids, exps)
		if err != nil {
			return err
		}
		var (
			recs    []AuditRecord
			seqs    = map[uint64]bool{}
			release []string // claimed for appends that failed
		)
		for i, r := range batch {
			if results[i].err != nil {
				continue
			}
			if r.use != nil {
				if !claimed[r.use.ID] {
					results[i].err = ErrChallengeUsed
					continue
				}
				delete(claimed, r.use.ID) // a second use in this batch is a replay
			}
			rec, h, res := runNext(r.next, last, head)
			if res.err == nil && res.panic == nil {
				res.err = checkSeq(rec, h)
			}
			if res.err == nil && res.panic == nil && (seqs[rec.Seq] || last != nil && rec.Seq <= last.Seq && seqTaken(ctx, conn.Conn(), rec.Seq)) {
				res.err = fmt.Errorf("audit record %d: %w", rec.Seq, ErrExists)
			}
			results[i] = res
			if res.err != nil || res.panic != nil {
				if r.use != nil {
					release = append(release, r.use.ID)
				}
				continue
			}
			recs, seqs[rec.Seq] = append(recs, rec), true
			last, head = &rec, &h
		}
		var reads []int // the batch's appends that read after the commit
		for i, r := range batch {
			if r.read != nil && results[i].err == nil && results[i].panic == nil {
				reads = append(reads, i)
			}
		}
		got, readErr, err := storeAndCommit(ctx, conn.Conn(), release, recs, head, readKeys(batch, reads))
		if err != nil {
			return err
		}
		committed = true
		for j, i := range reads {
			if readErr != nil {
				results[i].read = &readResult{err: readErr}
			} else {
				results[i].read = &got[j]
			}
		}
		return nil
	}()
	if err != nil {
		err = classify(err)
		for i := range results {
			if results[i].err == nil && results[i].panic == nil {
				results[i].err = err
			}
		}
	}
	for i, r := range batch {
		r.done <- results[i]
	}
}

// lockAndClaim opens a transaction on conn, locks the head and reads it and
// the last record, and claims the challenges ids (expiring at exps), in one
// round trip. The last record is read by a statement of its own, after the
// lock: it then sees what the head's previous holder committed (under READ
// COMMITTED each statement reads as of its start, and a join in the locking
// statement would read the record from before the wait).
func lockAndClaim(ctx context.Context, conn *pgx.Conn, ids []string, exps []int64) (last *AuditRecord, head *AuditHead, claimed map[string]bool, err error) {
	b := &pgx.Batch{}
	b.Queue("BEGIN")
	b.Queue(qLockHead)
	b.Queue(qLastAudit)
	if len(ids) > 0 {
		b.Queue(qClaimChallenges, ids, exps)
	}
	br := conn.SendBatch(ctx, b)
	defer br.Close()
	if _, err := br.Exec(); err != nil {
		return nil, nil, nil, fmt.Errorf("begin: %w", err)
	}
	if head, err = scanHead(br.QueryRow()); err != nil {
		return nil, nil, nil, err
	}
	if last, err = scanLast(br.QueryRow()); err != nil {
		return nil, nil, nil, err
	}
	claimed = map[string]bool{}
	if len(ids) > 0 {
		got, err := pgx.CollectRows(mustQuery(br.Query()), pgx.RowTo[string])
		if err != nil {
			return nil, nil, nil, fmt.Errorf("record challenge uses: %w", err)
		}
		for _, id := range got {
			claimed[id] = true
		}
	}
	return last, head, claimed, br.Close()
}

// readKeys returns the (vm, volume) pairs of batch[i] for i in reads.
func readKeys(batch []*auditReq, reads []int) []vmVolumeKey {
	keys := make([]vmVolumeKey, len(reads))
	for j, i := range reads {
		keys[j] = *batch[i].read
	}
	return keys
}

// storeAndCommit releases the challenges release (claimed for appends that
// failed), stores recs, moves the head to head and commits, and then reads
// the VM and volume of each of reads, in one round trip. The read runs
// after the COMMIT, outside the transaction, so it sees everything
// committed before the records. err is the commit's: with err nil, the
// records are committed, and readErr is the read's.
func storeAndCommit(ctx context.Context, conn *pgx.Conn, release []string, recs []AuditRecord, head *AuditHead, reads []vmVolumeKey) (got []readResult, readErr, err error) {
	b := &pgx.Batch{}
	if len(release) > 0 {
		b.Queue(`DELETE FROM used_challenges WHERE id = ANY($1)`, release)
	}
	if len(recs) > 0 {
		b.Queue(qInsertAudit, auditColumnsOf(recs)...)
		b.Queue(qWriteHead, int64(head.Seq), head.Hash, head.MAC)
		b.Queue(qAsyncCommit)
	}
	b.Queue("COMMIT")
	if len(recs) > 0 {
		b.Queue("BEGIN")
		b.Queue(qFlush)
		b.Queue("COMMIT")
	}
	if len(reads) > 0 {
		vms, ids := make([]string, len(reads)), make([]string, len(reads))
		for i, k := range reads {
			vms[i], ids[i] = k.vm, k.id
		}
		b.Queue(qVMsAndVolumes, vms, ids)
	}
	br := conn.SendBatch(ctx, b)
	defer br.Close()
	if len(release) > 0 {
		if _, err := br.Exec(); err != nil {
			return nil, nil, fmt.Errorf("release challenge uses: %w", err)
		}
	}
	if len(recs) > 0 {
		if _, err := br.Exec(); err != nil {
			return nil, nil, fmt.Errorf("insert audit records %d to %d: %w", recs[0].Seq, recs[len(recs)-1].Seq, err)
		}
		if _, err := br.Exec(); err != nil {
			return nil, nil, fmt.Errorf("write audit head: %w", err)
		}
		if _, err := br.Exec(); err != nil {
			return nil, nil, fmt.Errorf("commit asynchronously: %w", err)
		}
	}
	if err := execCommit(br); err != nil {
		return nil, nil, err
	}
	if len(recs) > 0 {
		// BEGIN and the update; then its COMMIT, which answers once the
		// WAL is flushed (and on a synchronous standby).
		for range 2 {
			if _, err := br.Exec(); err != nil {
				return nil, nil, fmt.Errorf("wait for the commit to be durable: %w", err)
			}
		}
		if err := execCommit(br); err != nil {
			return nil, nil, fmt.Errorf("wait for the commit to be durable: %w", err)
		}
	}
	if len(reads) == 0 {
		return nil, nil, nil
	}
	// Committed: from here an error is the read's alone.
	got, readErr = scanReads(br, reads)
	if cerr := br.Close(); readErr == nil && cerr != nil {
		readErr = cerr
	}
	return got, classify(readErr), nil
}

// execCommit reads a COMMIT's answer from br: a COMMIT of a transaction
// that failed answers ROLLBACK, not an error.
func execCommit(br pgx.BatchResults) error {
	tag, err := br.Exec()
	if err != nil {
		return fmt.Errorf("commit: %w", err)
	}
	if tag.String() != "COMMIT" {
		return fmt.Errorf("commit: the server answered %q", tag.String())
	}
	return nil
}

// scanReads reads qVMsAndVolumes' rows for reads; a pair with no row (no
// such VM) gets ErrNotFound.
func scanReads(br pgx.BatchResults, reads []vmVolumeKey) ([]readResult, error) {
	rows, err := br.Query()
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	got := make([]readResult, len(reads))
	seen := make([]bool, len(reads))
	for rows.Next() {
		var ord int64
		vm, vol, err := scanVMAndVolume(rows, &ord)
		if err != nil {
			return nil, err
		}
		if ord < 1 || ord > int64(len(reads)) || seen[ord-1] {
			return nil, fmt.Errorf("read after the commit: row for pair %d of %d", ord, len(reads))
		}
		got[ord-1], seen[ord-1] = readResult{vm: vm, vol: vol}, true
	}
	if err := rows.Err(); err != nil {
		return nil, err
	}
	for i, ok := range seen {
		if !ok {
			got[i].err = fmt.Errorf("get vm %q: %w", reads[i].vm, ErrNotFound)
		}
	}
	return got, nil
}

// auditColumnsOf returns recs as one array per column, for qInsertAudit.
func auditColumnsOf(recs []AuditRecord) []any {
	var (
		seqs, times                    = make([]int64, len(recs)), make([]int64, len(recs))
		actors, actions, subjs, detail = make([]string, len(recs)), make([]string, len(recs)), make([]string, len(recs)), make([]string, len(recs))
		prevs, hashes, macs            = make([][]byte, len(recs)), make([][]byte, len(recs)), make([][]byte, len(recs))
	)
	for i, r := range recs {
		seqs[i], times[i] = int64(r.Seq), ns(r.Time)
		actors[i], actions[i], subjs[i], detail[i] = r.Actor, r.Action, r.Subject, string(r.Details)
		prevs[i], hashes[i], macs[i] = r.PrevHash, r.Hash, r.MAC
	}
	return []any{seqs, times, actors, actions, subjs, detail, prevs, hashes, macs}
}

// seqTaken reports whether the chain holds a record of seq (an error
// counts as taken: the append is refused rather than risk a fork).
func seqTaken(ctx context.Context, q interface {
	QueryRow(context.Context, string, ...any) pgx.Row
}, seq uint64) bool {
	var one int
	err := q.QueryRow(ctx, `SELECT 1 FROM audit_log WHERE seq = $1`, int64(seq)).Scan(&one)
	return !isNoRowsPG(err)
}

// runNext calls next, turning a panic into a result the caller re-raises.
func runNext(next AuditNext, last *AuditRecord, head *AuditHead) (rec AuditRecord, h AuditHead, res writeResult) {
	defer func() {
		if p := recover(); p != nil {
			res = writeResult{panic: p}
		}
	}()
	rec, h, err := next(last, head)
	return rec, h, writeResult{err: err}
}

// ScanAudit implements AuditLog: one REPEATABLE READ snapshot for the head
// and the records, made durable before they are read.
func (p *Postgres) ScanAudit(ctx context.Context, from uint64, fn func(AuditRecord) error) (*AuditHead, error) {
	if from > 1<<63-1 {
		return nil, fmt.Errorf("scan audit: from %d out of range", from)
	}
	ctx, cancel := bound(ctx)
	defer cancel()
	tx, head, err := p.durableSnapshot(ctx)
	if err != nil {
		return nil, err
	}
	defer tx.Rollback(ctx)
	rows, err := tx.Query(ctx, `SELECT `+auditColumns+` FROM audit_log WHERE seq >= $1 ORDER BY seq`, int64(from))
	if err != nil {
		return nil, fmt.Errorf("scan audit: %w", classify(err))
	}
	defer rows.Close()
	for rows.Next() {
		a, err := pgAudit(rows)
		if err != nil {
			return nil, fmt.Errorf("scan audit: %w", err)
		}
		if err := fn(a); err != nil {
			return nil, err
		}
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("scan audit: %w", classify(err))
	}
	return head, nil
}

// durableSnapshot begins a read-only REPEATABLE READ transaction and reads
// the audit head (nil if none) in it. The snapshot may hold an append
// whose batch has committed but is not durable yet (commitAudit): a flush
// that commits after the snapshot was taken covers it, so that nothing is
// shown that a crash or failover could take back. The flush needs a second
// connection while the snapshot's is held, so one caller at a time takes
// it (scanFlush): were every pooled connection a snapshot's, each waiting
// for another, none would come back.
func (p *Postgres) durableSnapshot(ctx context.Context) (pgx.Tx, *AuditHead, error) {
	p.scanFlush.Lock()
	defer p.scanFlush.Unlock()
	tx, err := p.pool.BeginTx(ctx, pgx.TxOptions{IsoLevel: pgx.RepeatableRead, AccessMode: pgx.ReadOnly})
	if err != nil {
		return nil, nil, classify(err)
	}
	var (
		h   AuditHead
		seq int64
	)
	if err := tx.QueryRow(ctx, `SELECT seq, hash, mac FROM audit_head WHERE id = 1`).Scan(&seq, &h.Hash, &h.MAC); err != nil && !isNoRowsPG(err) {
		tx.Rollback(ctx)
		return nil, nil, fmt.Errorf("read audit head: %w", classify(err))
	}
	if _, err := p.pool.Exec(ctx, qFlush); err != nil {
		tx.Rollback(ctx)
		return nil, nil, fmt.Errorf("scan audit: wait for the chain's last commits to be durable: %w", classify(err))
	}
	if seq == 0 {
		return tx, nil, nil
	}
	h.Seq = uint64(seq)
	return tx, &h, nil
}

// Anchor returns the stored anchor, or nil if there is none.
func (p *Postgres) Anchor(ctx context.Context) (*Anchor, error) {
	ctx, cancel := bound(ctx)
	defer cancel()
	var (
		a       Anchor
		cn, seq int64
	)
	err := p.pool.QueryRow(ctx, `SELECT created_ns, genesis_seq, genesis_hash, mac FROM store_anchor WHERE id = 1`).Scan(&cn, &seq, &a.GenesisHash, &a.MAC)
	if isNoRowsPG(err) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read store anchor: %w", classify(err))
	}
	a.Created, a.GenesisSeq = fromNS(cn), uint64(seq)
	return &a, nil
}

// Adopt implements Backend as SQLite.Adopt does, in one transaction that
// holds the head's lock throughout: a replica adopting at the same time
// waits, then finds the anchor and gets ErrExists.
func (p *Postgres) Adopt(ctx context.Context, vm func(*VM) error, vol func(*Volume) error, next AuditNext, anchor func(AuditRecord) Anchor) error {
	err := p.tx(ctx, func(ctx context.Context, tx pgx.Tx) error {
		last, head, err := lockHead(ctx, tx)
		if err != nil {
			return err
		}
		var one int
		err = tx.QueryRow(ctx, `SELECT 1 FROM store_anchor WHERE id = 1`).Scan(&one)
		if err == nil {
			return fmt.Errorf("store anchor: %w", ErrExists)
		}
		if !isNoRowsPG(err) {
			return err
		}
		vms, err := pgx.CollectRows(mustQuery(tx.Query(ctx, `SELECT `+vmColumns+` FROM vms ORDER BY name FOR UPDATE`)),
			func(r pgx.CollectableRow) (VM, error) { return pgVM(r) })
		if err != nil {
			return fmt.Errorf("read vms: %w", err)
		}
		for _, v := range vms {
			if err := remacVM("adopt", v, vm, func(v VM) error {
				_, err := tx.Exec(ctx, `UPDATE vms SET row_mac = $1 WHERE name = $2`, v.MAC, v.Name)
				return err
			}); err != nil {
				return err
			}
		}
		vols, err := pgx.CollectRows(mustQuery(tx.Query(ctx, `SELECT `+volumeColumns+` FROM volumes ORDER BY id FOR UPDATE`)),
			func(r pgx.CollectableRow) (Volume, error) { return pgVolume(r) })
		if err != nil {
			return fmt.Errorf("read volumes: %w", err)
		}
		for _, v := range vols {
			if err := remacVolume("adopt", v, vol, func(v Volume) error {
				_, err := tx.Exec(ctx, `UPDATE volumes SET sealed_uk = $1, row_mac = $2 WHERE id = $3`, v.SealedUK, v.MAC, v.ID)
				return err
			}); err != nil {
				return err
			}
		}
		rec, h, err := next(last, head)
		if err != nil {
			return err
		}
		if err := checkSeq(rec, h); err != nil {
			return err
		}
		if err := insertRecord(ctx, tx, last, nil, rec); err != nil {
			return err
		}
		if err := writeHead(ctx, tx, &h); err != nil {
			return err
		}
		a := anchor(rec)
		_, err = tx.Exec(ctx, `INSERT INTO store_anchor (id, created_ns, genesis_seq, genesis_hash, mac) VALUES (1, $1, $2, $3, $4)`,
			ns(a.Created), int64(a.GenesisSeq), a.GenesisHash, a.MAC)
		return err
	})
	if err != nil {
		return fmt.Errorf("adopt store: %w", err)
	}
	return nil
}
