package store

import (
	"context"
	"database/sql"
	"fmt"
)

const auditColumns = `seq, time_ns, actor, action, subject, details, prev_hash, hash, mac`

func scanAudit(r rowScanner) (AuditRecord, error) {
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

func (s *SQLite) readHead(ctx context.Context, tx *sql.Tx) (*AuditHead, error) {
	var (
		h   AuditHead
		seq int64
	)
	err := s.txQueryRow(ctx, tx, `SELECT seq, hash, mac FROM audit_head WHERE id = 1`).Scan(&seq, &h.Hash, &h.MAC)
	if isNoRows(err) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read audit head: %w", err)
	}
	h.Seq = uint64(seq)
	return &h, nil
}

// AppendAudit implements AuditLog. The transaction is BEGIN IMMEDIATE, so it
// holds SQLite's write lock from the first read of the last record to the
// commit: writers in other processes wait, and cannot read the same "last"
// record.
func (s *SQLite) AppendAudit(ctx context.Context, next func(last *AuditRecord, head *AuditHead) (AuditRecord, AuditHead, error)) error {
	return s.appendAudit(ctx, nil, nil, next, nil)
}

// AppendAuditUsing implements AuditLog.
func (s *SQLite) AppendAuditUsing(ctx context.Context, use ChallengeUse, next func(last *AuditRecord, head *AuditHead) (AuditRecord, AuditHead, error)) error {
	if use.ID == "" {
		return fmt.Errorf("append audit: use challenge: empty id")
	}
	return s.appendAudit(ctx, &use, nil, next, nil)
}

// AppendAuditUsingThenRead implements Backend: the read is a second query
// (a read in the same process costs no round trip).
func (s *SQLite) AppendAuditUsingThenRead(ctx context.Context, use ChallengeUse, next AuditNext, vm, id string) (VM, *Volume, error) {
	if err := s.AppendAuditUsing(ctx, use, next); err != nil {
		return VM{}, nil, err
	}
	v, vol, err := s.GetVMAndVolume(ctx, vm, id)
	if err != nil {
		return VM{}, nil, fmt.Errorf("%w: %w", ErrReadAfterAppend, err)
	}
	return v, vol, nil
}

// appendAudit appends the record next makes; pre and post, if not nil, run
// before and after it in the same transaction (Adopt's writes).
func (s *SQLite) appendAudit(ctx context.Context, use *ChallengeUse, pre func(context.Context, *sql.Tx) error, next AuditNext,
	post func(context.Context, *sql.Tx, AuditRecord) error) error {
	err := s.write(ctx, func(ctx context.Context, tx *sql.Tx) error {
		if pre != nil {
			if err := pre(ctx, tx); err != nil {
				return err
			}
		}
		// First, so that a replay writes nothing; the batch's savepoint
		// undoes this insert if the append below fails.
		if use != nil {
			if err := s.useChallenge(ctx, tx, *use); err != nil {
				return err
			}
		}
		var last *AuditRecord
		a, err := scanAudit(s.txQueryRow(ctx, tx, `SELECT `+auditColumns+` FROM audit_log ORDER BY seq DESC LIMIT 1`))
		switch {
		case err == nil:
			last = &a
		case !isNoRows(err):
			return fmt.Errorf("read last audit record: %w", err)
		}
		head, err := s.readHead(ctx, tx)
		if err != nil {
			return err
		}
		rec, h, err := next(last, head)
		if err != nil {
			return err
		}
		if rec.Seq == 0 || rec.Seq > 1<<63-1 || h.Seq != rec.Seq {
			return fmt.Errorf("audit record seq %d, head seq %d: want equal and in 1..2^63-1", rec.Seq, h.Seq)
		}
		var one int
		err = s.txQueryRow(ctx, tx, `SELECT 1 FROM audit_log WHERE seq = ?`, int64(rec.Seq)).Scan(&one)
		if err == nil {
			return fmt.Errorf("audit record %d: %w", rec.Seq, ErrExists)
		}
		if !isNoRows(err) {
			return err
		}
		if _, err := s.txExec(ctx, tx, `INSERT INTO audit_log (`+auditColumns+`) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)`,
			int64(rec.Seq), ns(rec.Time), rec.Actor, rec.Action, rec.Subject, string(rec.Details), rec.PrevHash, rec.Hash, rec.MAC); err != nil {
			return fmt.Errorf("insert audit record %d: %w", rec.Seq, err)
		}
		if _, err := s.txExec(ctx, tx, `INSERT INTO audit_head (id, seq, hash, mac) VALUES (1, ?, ?, ?)
			ON CONFLICT (id) DO UPDATE SET seq = excluded.seq, hash = excluded.hash, mac = excluded.mac`,
			int64(h.Seq), h.Hash, h.MAC); err != nil {
			return fmt.Errorf("write audit head: %w", err)
		}
		if post != nil {
			return post(ctx, tx, rec)
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("append audit: %w", err)
	}
	return nil
}

// ScanAudit implements AuditLog.
func (s *SQLite) ScanAudit(ctx context.Context, from uint64, fn func(AuditRecord) error) (*AuditHead, error) {
	if from > 1<<63-1 {
		return nil, fmt.Errorf("scan audit: from %d out of range", from)
	}
	var head *AuditHead
	err := s.read(ctx, func(tx *sql.Tx) error {
		var err error
		if head, err = s.readHead(ctx, tx); err != nil {
			return err
		}
		rows, err := tx.QueryContext(ctx, `SELECT `+auditColumns+` FROM audit_log WHERE seq >= ? ORDER BY seq`, int64(from))
		if err != nil {
			return fmt.Errorf("scan audit: %w", err)
		}
		defer rows.Close()
		for rows.Next() {
			a, err := scanAudit(rows)
			if err != nil {
				return fmt.Errorf("scan audit: %w", err)
			}
			if err := fn(a); err != nil {
				return err
			}
		}
		return rows.Err()
	})
	if err != nil {
		return nil, err
	}
	return head, nil
}
