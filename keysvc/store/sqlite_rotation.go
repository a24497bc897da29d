package store

import (
	"bytes"
	"context"
	"database/sql"
	"fmt"
	"time"
)

var _ Rotations = (*SQLite)(nil)

// StartRotation implements Rotations.
func (s *SQLite) StartRotation(ctx context.Context, r Rotation, next AuditNext) (Rotation, error) {
	if len(r.SealedUK) == 0 {
		return Rotation{}, fmt.Errorf("start rotation of volume %q: no sealed key", r.Volume)
	}
	r.Started = time.Now().UTC()
	r.SealedUK = bytes.Clone(r.SealedUK)
	pre := func(ctx context.Context, tx *sql.Tx) error {
		var sealed []byte
		err := tx.QueryRowContext(ctx, `SELECT sealed_uk FROM volumes WHERE id = ?`, r.Volume).Scan(&sealed)
		if isNoRows(err) {
			return fmt.Errorf("volume %q: %w", r.Volume, ErrNotFound)
		}
		if err != nil {
			return err
		}
		if len(sealed) == 0 {
			return fmt.Errorf("volume %q is erased; there is no key to rotate: %w", r.Volume, ErrImmutable)
		}
		var one int
		err = tx.QueryRowContext(ctx, `SELECT 1 FROM volume_rotations WHERE volume = ?`, r.Volume).Scan(&one)
		if err == nil {
			return fmt.Errorf("volume %q has a rotation pending already: %w", r.Volume, ErrExists)
		}
		if !isNoRows(err) {
			return err
		}
		_, err = tx.ExecContext(ctx, `INSERT INTO volume_rotations (volume, sealed_uk, started_ns) VALUES (?, ?, ?)`,
			r.Volume, r.SealedUK, ns(r.Started))
		return err
	}
	if err := s.appendAudit(ctx, nil, pre, next, nil); err != nil {
		return Rotation{}, fmt.Errorf("start rotation: %w", err)
	}
	return r, nil
}

func scanRotation(r rowScanner) (Rotation, error) {
	var (
		rot     Rotation
		started int64
	)
	if err := r.Scan(&rot.Volume, &rot.SealedUK, &started); err != nil {
		return Rotation{}, err
	}
	rot.Started = fromNS(started)
	return rot, nil
}

// GetRotation implements Rotations.
func (s *SQLite) GetRotation(ctx context.Context, volume string) (Rotation, error) {
	r, err := scanRotation(s.queryRow(ctx, `SELECT volume, sealed_uk, started_ns FROM volume_rotations WHERE volume = ?`, volume))
	if isNoRows(err) {
		return Rotation{}, fmt.Errorf("rotation of volume %q: %w", volume, ErrNotFound)
	}
	if err != nil {
		return Rotation{}, fmt.Errorf("get rotation of volume %q: %w", volume, err)
	}
	return r, nil
}

// FinishRotation implements Rotations. Like an erase, it truncates the WAL
// afterwards, so that the old sealed UK's page images do not linger there
// (see SQLite for what that does and does not scrub).
func (s *SQLite) FinishRotation(ctx context.Context, volume string, fn func(*Volume, Rotation) error, next AuditNext) (Volume, error) {
	var out Volume
	pre := func(ctx context.Context, tx *sql.Tx) error {
		rot, err := scanRotation(tx.QueryRowContext(ctx, `SELECT volume, sealed_uk, started_ns FROM volume_rotations WHERE volume = ?`, volume))
		if isNoRows(err) {
			return fmt.Errorf("rotation of volume %q: %w", volume, ErrNotFound)
		}
		if err != nil {
			return err
		}
		old, err := scanVolume(tx.QueryRowContext(ctx, `SELECT `+volumeColumns+` FROM volumes WHERE id = ?`, volume))
		if err != nil { // the foreign key and the erase trigger keep the volume and its key
			return fmt.Errorf("read volume %q: %w", volume, err)
		}
		v := old
		v.SealedUK = bytes.Clone(old.SealedUK)
		if err := fn(&v, rot); err != nil {
			return err
		}
		if v.ID != old.ID || v.VM != old.VM || !v.Created.Equal(old.Created) || !v.ErasedAt.Equal(old.ErasedAt) || len(v.SealedUK) == 0 {
			return fmt.Errorf("volume %q: a rotation changes only the sealed key and the MAC: %w", volume, ErrImmutable)
		}
		if _, err := tx.ExecContext(ctx, `UPDATE volumes SET sealed_uk = ?, row_mac = ? WHERE id = ?`, v.SealedUK, v.MAC, volume); err != nil {
			return err
		}
		if _, err := tx.ExecContext(ctx, `DELETE FROM volume_rotations WHERE volume = ?`, volume); err != nil {
			return err
		}
		out = v
		return nil
	}
	if err := s.appendAudit(ctx, nil, pre, next, nil); err != nil {
		return Volume{}, fmt.Errorf("finish rotation: %w", err)
	}
	s.truncateWAL(ctx)
	return out, nil
}

// RekeyRotations implements Rotations.
func (s *SQLite) RekeyRotations(ctx context.Context, fn func(*Rotation) error) (int, error) {
	n := 0
	err := s.write(ctx, func(ctx context.Context, tx *sql.Tx) error {
		n = 0
		rots, err := scanAll(ctx, tx, `SELECT volume, sealed_uk, started_ns FROM volume_rotations ORDER BY volume`, scanRotation)
		if err != nil {
			return err
		}
		for _, r := range rots {
			vol := r.Volume
			if err := fn(&r); err != nil {
				return err
			}
			if r.Volume != vol || len(r.SealedUK) == 0 {
				return fmt.Errorf("rekey rotation of volume %q: only its sealed key may change: %w", vol, ErrImmutable)
			}
			if _, err := tx.ExecContext(ctx, `UPDATE volume_rotations SET sealed_uk = ? WHERE volume = ?`, r.SealedUK, vol); err != nil {
				return err
			}
			n++
		}
		return nil
	})
	if err != nil {
		return 0, fmt.Errorf("rekey rotations: %w", err)
	}
	return n, nil
}

// PendingRotations implements Rotations.
func (s *SQLite) PendingRotations(ctx context.Context) (map[string]time.Time, error) {
	rows, err := s.db.QueryContext(ctx, `SELECT volume, started_ns FROM volume_rotations`)
	if err != nil {
		return nil, fmt.Errorf("list rotations: %w", err)
	}
	defer rows.Close()
	out := map[string]time.Time{}
	for rows.Next() {
		var (
			id      string
			started int64
		)
		if err := rows.Scan(&id, &started); err != nil {
			return nil, fmt.Errorf("list rotations: %w", err)
		}
		out[id] = fromNS(started)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("list rotations: %w", err)
	}
	return out, nil
}
