package store

import (
	"context"
	"database/sql"
	"fmt"
	"time"
)

// Anchor is the store's genesis anchor: written once, when the key service
// adopted the store (authenticated its rows under the master key). The key
// service computes and checks its MAC; the store keeps the bytes.
type Anchor struct {
	Created time.Time
	// GenesisSeq and GenesisHash name the audit record written with it.
	GenesisSeq  uint64
	GenesisHash []byte
	MAC         []byte
}

// Anchor returns the stored anchor, or nil if there is none.
func (s *SQLite) Anchor(ctx context.Context) (*Anchor, error) {
	var (
		a       Anchor
		cn, seq int64
	)
	err := s.db.QueryRowContext(ctx, `SELECT created_ns, genesis_seq, genesis_hash, mac FROM store_anchor WHERE id = 1`).Scan(&cn, &seq, &a.GenesisHash, &a.MAC)
	if isNoRows(err) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read store anchor: %w", err)
	}
	a.Created, a.GenesisSeq = fromNS(cn), uint64(seq)
	return &a, nil
}

// Adopt authenticates a store that has no anchor yet, in one write
// transaction: it calls vm for every VM and vol for every volume and stores
// what they set (a VM's MAC; a volume's MAC and, unless erased, its sealed
// UK, which the key service re-seals), appends the audit record next makes,
// and stores the anchor that anchor makes from that record. All of it is
// stored, or none. ErrExists if an anchor is stored already (another
// replica adopted the store first).
func (s *SQLite) Adopt(ctx context.Context, vm func(*VM) error, vol func(*Volume) error, next AuditNext, anchor func(AuditRecord) Anchor) error {
	pre := func(ctx context.Context, tx *sql.Tx) error {
		var one int
		err := tx.QueryRowContext(ctx, `SELECT 1 FROM store_anchor WHERE id = 1`).Scan(&one)
		if err == nil {
			return fmt.Errorf("store anchor: %w", ErrExists)
		}
		if !isNoRows(err) {
			return err
		}
		vms, err := scanAll(ctx, tx, `SELECT `+vmColumns+` FROM vms ORDER BY name`, scanVM)
		if err != nil {
			return fmt.Errorf("read vms: %w", err)
		}
		for _, v := range vms {
			if err := remacVM("adopt", v, vm, func(v VM) error {
				_, err := tx.ExecContext(ctx, `UPDATE vms SET row_mac = ? WHERE name = ?`, v.MAC, v.Name)
				return err
			}); err != nil {
				return err
			}
		}
		vols, err := scanAll(ctx, tx, `SELECT `+volumeColumns+` FROM volumes ORDER BY id`, scanVolume)
		if err != nil {
			return fmt.Errorf("read volumes: %w", err)
		}
		for _, v := range vols {
			if err := remacVolume("adopt", v, vol, func(v Volume) error {
				_, err := tx.ExecContext(ctx, `UPDATE volumes SET sealed_uk = ?, row_mac = ? WHERE id = ?`, v.SealedUK, v.MAC, v.ID)
				return err
			}); err != nil {
				return err
			}
		}
		return nil
	}
	post := func(ctx context.Context, tx *sql.Tx, rec AuditRecord) error {
		a := anchor(rec)
		_, err := tx.ExecContext(ctx, `INSERT INTO store_anchor (id, created_ns, genesis_seq, genesis_hash, mac) VALUES (1, ?, ?, ?, ?)`,
			ns(a.Created), int64(a.GenesisSeq), a.GenesisHash, a.MAC)
		return err
	}
	if err := s.appendAudit(ctx, nil, pre, next, post); err != nil {
		return fmt.Errorf("adopt store: %w", err)
	}
	return nil
}

// scanAll reads every row of query with scan.
func scanAll[T any](ctx context.Context, tx *sql.Tx, query string, scan func(rowScanner) (T, error)) ([]T, error) {
	return scanAllArgs(ctx, tx, query, scan)
}
