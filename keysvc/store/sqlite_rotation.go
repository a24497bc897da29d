package store

import (
	"context"
	"database/sql"
	"fmt"
	"time"
)

var _ Rotations = (*SQLite)(nil)

// StartRotation implements Rotations.
func (s *SQLite) StartRotation(ctx context.Context, volume string, fn RotationStart, next AuditNext) (Rotation, error) {
	var out Rotation
	pre := func(ctx context.Context, tx *sql.Tx) error {
		old, err := scanVolume(tx.QueryRowContext(ctx, `SELECT `+volumeColumns+` FROM volumes WHERE id = ?`, volume))
		if isNoRows(err) {
			return fmt.Errorf("volume %q: %w", volume, ErrNotFound)
		}
		if err != nil {
			return err
		}
		var one int
		err = tx.QueryRowContext(ctx, `SELECT 1 FROM volume_rotations WHERE volume = ?`, volume).Scan(&one)
		if err == nil {
			return fmt.Errorf("volume %q has a rotation pending already: %w", volume, ErrExists)
		}
		if !isNoRows(err) {
			return err
		}
		v, r, err := startRotation(old, fn)
		if err != nil {
			return err
		}
		if _, err := tx.ExecContext(ctx, `UPDATE volumes SET rotation = ?, rotation_pending = 1, row_mac = ? WHERE id = ?`, int64(v.Rotation), v.MAC, volume); err != nil {
			return err
		}
		if _, err = tx.ExecContext(ctx, `INSERT INTO volume_rotations (`+rotationColumns+`) VALUES (?, ?, ?, ?, 0, 0, ?)`,
			r.Volume, r.SealedUK, ns(r.Started), int64(r.Generation), r.MAC); err != nil {
			return err
		}
		out = r
		return nil
	}
	if err := s.appendAudit(ctx, nil, pre, next, nil); err != nil {
		return Rotation{}, fmt.Errorf("start rotation: %w", err)
	}
	return out, nil
}

func scanRotation(r rowScanner) (Rotation, error) {
	var (
		rot          Rotation
		started, gen int64
	)
	if err := r.Scan(&rot.Volume, &rot.SealedUK, &started, &gen, &rot.Released, &rot.Cancelling, &rot.MAC); err != nil {
		return Rotation{}, err
	}
	rot.Started, rot.Generation = fromNS(started), uint64(gen)
	return rot, nil
}

// GetRotation implements Rotations.
func (s *SQLite) GetRotation(ctx context.Context, volume string) (Rotation, error) {
	r, err := scanRotation(s.queryRow(ctx, `SELECT `+rotationColumns+` FROM volume_rotations WHERE volume = ?`, volume))
	if isNoRows(err) {
		return Rotation{}, fmt.Errorf("rotation of volume %q: %w", volume, ErrNotFound)
	}
	if err != nil {
		return Rotation{}, fmt.Errorf("get rotation of volume %q: %w", volume, err)
	}
	return r, nil
}

// readRotation reads the volume and its rotation row in tx.
func (s *SQLite) readRotation(ctx context.Context, tx *sql.Tx, volume string) (Volume, Rotation, error) {
	rot, err := scanRotation(tx.QueryRowContext(ctx, `SELECT `+rotationColumns+` FROM volume_rotations WHERE volume = ?`, volume))
	if isNoRows(err) {
		return Volume{}, Rotation{}, fmt.Errorf("rotation of volume %q: %w", volume, ErrNotFound)
	}
	if err != nil {
		return Volume{}, Rotation{}, err
	}
	v, err := scanVolume(tx.QueryRowContext(ctx, `SELECT `+volumeColumns+` FROM volumes WHERE id = ?`, volume))
	if err != nil { // the foreign key and the erase trigger keep the volume and its key
		return Volume{}, Rotation{}, fmt.Errorf("read volume %q: %w", volume, err)
	}
	return v, rot, nil
}

// UpdateRotation implements Rotations.
func (s *SQLite) UpdateRotation(ctx context.Context, volume string, fn func(Volume, *Rotation) error, next AuditNext) (Rotation, error) {
	var out Rotation
	pre := func(ctx context.Context, tx *sql.Tx) error {
		v, old, err := s.readRotation(ctx, tx, volume)
		if err != nil {
			return err
		}
		r, err := updateRotation(v, old, fn)
		if err != nil {
			return err
		}
		if _, err := tx.ExecContext(ctx, `UPDATE volume_rotations SET released = ?, cancelling = ?, row_mac = ? WHERE volume = ?`,
			r.Released, r.Cancelling, r.MAC, volume); err != nil {
			return err
		}
		out = r
		return nil
	}
	var err error
	if next == nil {
		err = s.write(ctx, pre)
	} else {
		err = s.appendAudit(ctx, nil, pre, next, nil)
	}
	if err != nil {
		return Rotation{}, fmt.Errorf("update rotation: %w", err)
	}
	return out, nil
}

// FinishRotation implements Rotations. Like an erase, it truncates the WAL
// afterwards, so that the destroyed key's page images do not linger there
// (see SQLite for what that does and does not scrub).
func (s *SQLite) FinishRotation(ctx context.Context, volume string, fn func(*Volume, Rotation) error, next AuditNext) (Volume, error) {
	var out Volume
	pre := func(ctx context.Context, tx *sql.Tx) error {
		old, rot, err := s.readRotation(ctx, tx, volume)
		if err != nil {
			return err
		}
		v, err := finishRotation(old, rot, fn)
		if err != nil {
			return err
		}
		if _, err := tx.ExecContext(ctx, `UPDATE volumes SET sealed_uk = ?, rotation_pending = 0, row_mac = ? WHERE id = ?`, v.SealedUK, v.MAC, volume); err != nil {
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
		rots, err := scanAll(ctx, tx, `SELECT `+rotationColumns+` FROM volume_rotations ORDER BY volume`, scanRotation)
		if err != nil {
			return err
		}
		for _, r := range rots {
			if err := rekeyRotation(r, fn, func(r Rotation) error {
				_, err := tx.ExecContext(ctx, `UPDATE volume_rotations SET sealed_uk = ?, row_mac = ? WHERE volume = ?`, r.SealedUK, r.MAC, r.Volume)
				return err
			}); err != nil {
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

// ListRotations implements Rotations.
func (s *SQLite) ListRotations(ctx context.Context) ([]Rotation, error) {
	var out []Rotation
	err := s.read(ctx, func(tx *sql.Tx) error {
		var err error
		out, err = scanAll(ctx, tx, `SELECT `+rotationColumns+` FROM volume_rotations ORDER BY volume`, scanRotation)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("list rotations: %w", err)
	}
	return out, nil
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
