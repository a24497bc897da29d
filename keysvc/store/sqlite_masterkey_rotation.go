package store

import (
	"bytes"
	"context"
	"database/sql"
	"fmt"
)

var _ MasterKeyRotations = (*SQLite)(nil)

const mkRotationColumns = `old_key, new_key, started_ns, vm_cursor, volume_cursor, vms, volumes`

func scanMasterKeyRotation(r rowScanner) (MasterKeyRotation, error) {
	var (
		x  MasterKeyRotation
		sn int64
	)
	err := r.Scan(&x.OldKey, &x.NewKey, &sn, &x.VMCursor, &x.VolumeCursor, &x.VMs, &x.Volumes)
	x.Started = fromNS(sn)
	return x, err
}

// MasterKeyRotation returns the rotation under way, or nil.
func (s *SQLite) MasterKeyRotation(ctx context.Context) (*MasterKeyRotation, error) {
	r, err := scanMasterKeyRotation(s.db.QueryRowContext(ctx, `SELECT `+mkRotationColumns+` FROM master_key_rotation WHERE id = 1`))
	if isNoRows(err) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read master-key rotation: %w", err)
	}
	return &r, nil
}

// BeginMasterKeyRotation stores r, re-MACs the anchor with anchor and appends
// next's audit record, in one transaction.
func (s *SQLite) BeginMasterKeyRotation(ctx context.Context, r MasterKeyRotation, anchor func(Anchor) Anchor, next AuditNext) error {
	pre := func(ctx context.Context, tx *sql.Tx) error {
		var one int
		err := tx.QueryRowContext(ctx, `SELECT 1 FROM master_key_rotation WHERE id = 1`).Scan(&one)
		if err == nil {
			return fmt.Errorf("master-key rotation: one is under way: %w", ErrExists)
		}
		if !isNoRows(err) {
			return err
		}
		if _, err := tx.ExecContext(ctx, `INSERT INTO master_key_rotation (id, old_key, new_key, started_ns) VALUES (1, ?, ?, ?)`,
			r.OldKey, r.NewKey, ns(r.Started)); err != nil {
			return err
		}
		var (
			a       Anchor
			cn, seq int64
		)
		err = tx.QueryRowContext(ctx, `SELECT created_ns, genesis_seq, genesis_hash, mac FROM store_anchor WHERE id = 1`).Scan(&cn, &seq, &a.GenesisHash, &a.MAC)
		if isNoRows(err) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("read store anchor: %w", err)
		}
		a.Created, a.GenesisSeq = fromNS(cn), uint64(seq)
		b := anchor(a)
		if !b.Created.Equal(a.Created) || b.GenesisSeq != a.GenesisSeq || !bytes.Equal(b.GenesisHash, a.GenesisHash) {
			return fmt.Errorf("re-MAC store anchor: only its MAC may change: %w", ErrImmutable)
		}
		_, err = tx.ExecContext(ctx, `UPDATE store_anchor SET mac = ? WHERE id = 1`, b.MAC)
		return err
	}
	if err := s.appendAudit(ctx, nil, pre, next, nil); err != nil {
		return fmt.Errorf("begin master-key rotation: %w", err)
	}
	return nil
}

// RekeyBatch re-keys up to limit rows past the cursors in one transaction.
func (s *SQLite) RekeyBatch(ctx context.Context, limit int, vm func(*VM) error, vol func(*Volume) error) (out MasterKeyRotation, done bool, err error) {
	if limit < 1 {
		return out, false, fmt.Errorf("rekey batch: limit %d, want at least 1", limit)
	}
	err = s.write(ctx, func(ctx context.Context, tx *sql.Tx) error {
		r, err := scanMasterKeyRotation(tx.QueryRowContext(ctx, `SELECT `+mkRotationColumns+` FROM master_key_rotation WHERE id = 1`))
		if isNoRows(err) {
			return fmt.Errorf("master-key rotation: %w", ErrNotFound)
		}
		if err != nil {
			return err
		}
		left := limit
		vms, err := scanAllArgs(ctx, tx, `SELECT `+vmColumns+` FROM vms WHERE name > ? ORDER BY name LIMIT ?`, scanVM, r.VMCursor, left)
		if err != nil {
			return fmt.Errorf("read vms: %w", err)
		}
		for _, v := range vms {
			if err := remacVM("rekey", v, vm, func(v VM) error {
				_, err := tx.ExecContext(ctx, `UPDATE vms SET row_mac = ? WHERE name = ?`, v.MAC, v.Name)
				return err
			}); err != nil {
				return err
			}
			r.VMCursor, r.VMs, left = v.Name, r.VMs+1, left-1
		}
		var vols []Volume
		if left > 0 {
			vols, err = scanAllArgs(ctx, tx, `SELECT `+volumeColumns+` FROM volumes WHERE id > ? ORDER BY id LIMIT ?`, scanVolume, r.VolumeCursor, left)
			if err != nil {
				return fmt.Errorf("read volumes: %w", err)
			}
		}
		for _, v := range vols {
			if err := remacVolume("rekey", v, vol, func(v Volume) error {
				_, err := tx.ExecContext(ctx, `UPDATE volumes SET sealed_uk = ?, row_mac = ? WHERE id = ?`, v.SealedUK, v.MAC, v.ID)
				return err
			}); err != nil {
				return err
			}
			r.VolumeCursor, r.Volumes, left = v.ID, r.Volumes+1, left-1
		}
		// A batch that filled up may have stopped right at the end: the
		// next one finds nothing and reports done.
		done = left > 0
		if _, err := tx.ExecContext(ctx, `UPDATE master_key_rotation SET vm_cursor = ?, volume_cursor = ?, vms = ?, volumes = ? WHERE id = 1`,
			r.VMCursor, r.VolumeCursor, r.VMs, r.Volumes); err != nil {
			return fmt.Errorf("advance rotation cursors: %w", err)
		}
		out = r
		return nil
	})
	if err != nil {
		return out, false, fmt.Errorf("master-key rotation batch: %w", err)
	}
	return out, done, nil
}

// FinishMasterKeyRotation appends next's record, deletes the rotation row and
// records the new key's fingerprint as the one replicas must hold, in one
// transaction.
func (s *SQLite) FinishMasterKeyRotation(ctx context.Context, next AuditNext) error {
	pre := func(ctx context.Context, tx *sql.Tx) error {
		var newKey string
		err := tx.QueryRowContext(ctx, `DELETE FROM master_key_rotation WHERE id = 1 RETURNING new_key`).Scan(&newKey)
		if isNoRows(err) {
			return fmt.Errorf("master-key rotation: %w", ErrNotFound)
		}
		if err != nil {
			return err
		}
		// From now on replicas must hold the new key (ClaimMasterKey).
		_, err = tx.ExecContext(ctx, `UPDATE master_key_check SET fingerprint = ? WHERE id = 1`, []byte(newKey))
		return err
	}
	if err := s.appendAudit(ctx, nil, pre, next, nil); err != nil {
		return fmt.Errorf("finish master-key rotation: %w", err)
	}
	return nil
}

// scanAllArgs is scanAll with query arguments.
func scanAllArgs[T any](ctx context.Context, tx *sql.Tx, query string, scan func(rowScanner) (T, error), args ...any) ([]T, error) {
	rows, err := tx.QueryContext(ctx, query, args...)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []T
	for rows.Next() {
		v, err := scan(rows)
		if err != nil {
			return nil, err
		}
		out = append(out, v)
	}
	return out, rows.Err()
}
