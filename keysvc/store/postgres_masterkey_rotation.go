package store

import (
	"bytes"
	"context"
	"fmt"

	"github.com/jackc/pgx/v5"
)

var _ MasterKeyRotations = (*Postgres)(nil)

// appendAuditTx appends the record next makes in tx, after pre: the head is
// locked first, so that these appends take turns with every other
// appender in every replica, and in the same lock order (head, then the
// rows pre touches).
func appendAuditTx(ctx context.Context, tx pgx.Tx, pre func(context.Context, pgx.Tx) error, next AuditNext) error {
	last, head, err := lockHead(ctx, tx)
	if err != nil {
		return err
	}
	if err := pre(ctx, tx); err != nil {
		return err
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
	return writeHead(ctx, tx, &h)
}

// MasterKeyRotation returns the rotation under way, or nil.
func (p *Postgres) MasterKeyRotation(ctx context.Context) (*MasterKeyRotation, error) {
	ctx, cancel := bound(ctx)
	defer cancel()
	r, err := scanMasterKeyRotation(p.pool.QueryRow(ctx, `SELECT `+mkRotationColumns+` FROM master_key_rotation WHERE id = 1`))
	if isNoRowsPG(err) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read master-key rotation: %w", classify(err))
	}
	return &r, nil
}

// BeginMasterKeyRotation stores r, re-MACs the anchor with anchor and appends
// next's record in one transaction, under the audit head's lock: of two
// replicas beginning at once, the second finds the first's row.
func (p *Postgres) BeginMasterKeyRotation(ctx context.Context, r MasterKeyRotation, anchor func(Anchor) Anchor, next AuditNext) error {
	err := p.tx(ctx, func(ctx context.Context, tx pgx.Tx) error {
		return appendAuditTx(ctx, tx, func(ctx context.Context, tx pgx.Tx) error {
			tag, err := tx.Exec(ctx, `INSERT INTO master_key_rotation (id, old_key, new_key, started_ns) VALUES (1, $1, $2, $3) ON CONFLICT (id) DO NOTHING`,
				r.OldKey, r.NewKey, ns(r.Started))
			if err != nil {
				return err
			}
			if tag.RowsAffected() == 0 {
				return fmt.Errorf("master-key rotation: one is under way: %w", ErrExists)
			}
			var (
				a       Anchor
				cn, seq int64
			)
			err = tx.QueryRow(ctx, `SELECT created_ns, genesis_seq, genesis_hash, mac FROM store_anchor WHERE id = 1 FOR UPDATE`).Scan(&cn, &seq, &a.GenesisHash, &a.MAC)
			if isNoRowsPG(err) {
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
			_, err = tx.Exec(ctx, `UPDATE store_anchor SET mac = $1 WHERE id = 1`, b.MAC)
			return err
		}, next)
	})
	if err != nil {
		return fmt.Errorf("begin master-key rotation: %w", err)
	}
	return nil
}

// RekeyBatch re-keys up to limit rows past the cursors in one transaction
// that holds the rotation row's lock from its first statement: a replica
// running a batch at the same time waits, then reads the cursors this one
// advanced and goes on from there, so no batch is applied twice.
func (p *Postgres) RekeyBatch(ctx context.Context, limit int, vm func(*VM) error, vol func(*Volume) error) (out MasterKeyRotation, done bool, err error) {
	if limit < 1 {
		return out, false, fmt.Errorf("rekey batch: limit %d, want at least 1", limit)
	}
	err = p.tx(ctx, func(ctx context.Context, tx pgx.Tx) error {
		r, err := scanMasterKeyRotation(tx.QueryRow(ctx, `SELECT `+mkRotationColumns+` FROM master_key_rotation WHERE id = 1 FOR UPDATE`))
		if isNoRowsPG(err) {
			return fmt.Errorf("master-key rotation: %w", ErrNotFound)
		}
		if err != nil {
			return err
		}
		left := limit
		vms, err := pgx.CollectRows(mustQuery(tx.Query(ctx, `SELECT `+vmColumns+` FROM vms WHERE name > $1 ORDER BY name LIMIT $2 FOR UPDATE`, r.VMCursor, left)),
			func(r pgx.CollectableRow) (VM, error) { return pgVM(r) })
		if err != nil {
			return fmt.Errorf("read vms: %w", err)
		}
		for _, v := range vms {
			if err := remacVM("rekey", v, vm, func(v VM) error {
				_, err := tx.Exec(ctx, `UPDATE vms SET row_mac = $1 WHERE name = $2`, v.MAC, v.Name)
				return err
			}); err != nil {
				return err
			}
			r.VMCursor, r.VMs, left = v.Name, r.VMs+1, left-1
		}
		var vols []Volume
		if left > 0 {
			vols, err = pgx.CollectRows(mustQuery(tx.Query(ctx, `SELECT `+volumeColumns+` FROM volumes WHERE id > $1 ORDER BY id LIMIT $2 FOR UPDATE`, r.VolumeCursor, left)),
				func(r pgx.CollectableRow) (Volume, error) { return pgVolume(r) })
			if err != nil {
				return fmt.Errorf("read volumes: %w", err)
			}
		}
		for _, v := range vols {
			if err := remacVolume("rekey", v, vol, func(v Volume) error {
				_, err := tx.Exec(ctx, `UPDATE volumes SET sealed_uk = $1, row_mac = $2 WHERE id = $3`, v.SealedUK, v.MAC, v.ID)
				return err
			}); err != nil {
				return err
			}
			r.VolumeCursor, r.Volumes, left = v.ID, r.Volumes+1, left-1
		}
		done = left > 0
		if _, err := tx.Exec(ctx, `UPDATE master_key_rotation SET vm_cursor = $1, volume_cursor = $2, vms = $3, volumes = $4 WHERE id = 1`,
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
func (p *Postgres) FinishMasterKeyRotation(ctx context.Context, next AuditNext) error {
	err := p.tx(ctx, func(ctx context.Context, tx pgx.Tx) error {
		return appendAuditTx(ctx, tx, func(ctx context.Context, tx pgx.Tx) error {
			var newKey string
			err := tx.QueryRow(ctx, `DELETE FROM master_key_rotation WHERE id = 1 RETURNING new_key`).Scan(&newKey)
			if isNoRowsPG(err) {
				return fmt.Errorf("master-key rotation: %w", ErrNotFound)
			}
			if err != nil {
				return err
			}
			_, err = tx.Exec(ctx, `UPDATE master_key_check SET fingerprint = $1 WHERE id = 1`, []byte(newKey))
			return err
		}, next)
	})
	if err != nil {
		return fmt.Errorf("finish master-key rotation: %w", err)
	}
	return nil
}
