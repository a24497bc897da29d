package store

import (
	"context"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
)

var _ Rotations = (*Postgres)(nil)

// Lock order, here as in every other writer: the audit head, then the
// volume, then its rotation row (an erase locks the volume and then, by
// its trigger, the rotation row), so that no two transactions wait on each
// other.

// StartRotation implements Rotations, in one transaction under the audit
// head's lock with the volume's row locked: an erase at the same time
// either commits first (and this finds the volume erased) or waits for
// this and then deletes the new pending UK with the volume's.
func (p *Postgres) StartRotation(ctx context.Context, volume string, fn RotationStart, next AuditNext) (Rotation, error) {
	var out Rotation
	err := p.tx(ctx, func(ctx context.Context, tx pgx.Tx) error {
		return appendAuditTx(ctx, tx, func(ctx context.Context, tx pgx.Tx) error {
			old, err := pgVolume(tx.QueryRow(ctx, `SELECT `+volumeColumns+` FROM volumes WHERE id = $1 FOR UPDATE`, volume))
			if isNoRowsPG(err) {
				return fmt.Errorf("volume %q: %w", volume, ErrNotFound)
			}
			if err != nil {
				return err
			}
			var one int
			err = tx.QueryRow(ctx, `SELECT 1 FROM volume_rotations WHERE volume = $1`, volume).Scan(&one)
			if err == nil {
				return fmt.Errorf("volume %q has a rotation pending already: %w", volume, ErrExists)
			}
			if !isNoRowsPG(err) {
				return err
			}
			v, r, err := startRotation(old, fn)
			if err != nil {
				return err
			}
			if _, err := tx.Exec(ctx, `UPDATE volumes SET rotation = $1, rotation_pending = true, row_mac = $2 WHERE id = $3`, int64(v.Rotation), v.MAC, volume); err != nil {
				return err
			}
			tag, err := tx.Exec(ctx, `INSERT INTO volume_rotations (`+rotationColumns+`) VALUES ($1, $2, $3, $4, false, false, $5) ON CONFLICT (volume) DO NOTHING`,
				r.Volume, r.SealedUK, ns(r.Started), int64(r.Generation), r.MAC)
			if err != nil {
				return err
			}
			if tag.RowsAffected() == 0 {
				return fmt.Errorf("volume %q has a rotation pending already: %w", volume, ErrExists)
			}
			out = r
			return nil
		}, next)
	})
	if err != nil {
		return Rotation{}, fmt.Errorf("start rotation: %w", err)
	}
	return out, nil
}

func pgRotation(r pgx.Row) (Rotation, error) {
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
func (p *Postgres) GetRotation(ctx context.Context, volume string) (Rotation, error) {
	ctx, cancel := bound(ctx)
	defer cancel()
	r, err := pgRotation(p.pool.QueryRow(ctx, `SELECT `+rotationColumns+` FROM volume_rotations WHERE volume = $1`, volume))
	if isNoRowsPG(err) {
		return Rotation{}, fmt.Errorf("rotation of volume %q: %w", volume, ErrNotFound)
	}
	if err != nil {
		return Rotation{}, fmt.Errorf("get rotation of volume %q: %w", volume, classify(err))
	}
	return r, nil
}

// lockRotation reads the volume and then its rotation row in tx, both
// locked (FOR UPDATE), in the lock order above.
func lockRotation(ctx context.Context, tx pgx.Tx, volume string) (Volume, Rotation, error) {
	v, err := pgVolume(tx.QueryRow(ctx, `SELECT `+volumeColumns+` FROM volumes WHERE id = $1 FOR UPDATE`, volume))
	if isNoRowsPG(err) {
		return Volume{}, Rotation{}, fmt.Errorf("rotation of volume %q: %w", volume, ErrNotFound)
	}
	if err != nil {
		return Volume{}, Rotation{}, fmt.Errorf("read volume %q: %w", volume, err)
	}
	rot, err := pgRotation(tx.QueryRow(ctx, `SELECT `+rotationColumns+` FROM volume_rotations WHERE volume = $1 FOR UPDATE`, volume))
	if isNoRowsPG(err) {
		return Volume{}, Rotation{}, fmt.Errorf("rotation of volume %q: %w", volume, ErrNotFound)
	}
	if err != nil {
		return Volume{}, Rotation{}, err
	}
	return v, rot, nil
}

// UpdateRotation implements Rotations, with the volume and its rotation
// row locked, under the audit head's lock when next is not nil.
func (p *Postgres) UpdateRotation(ctx context.Context, volume string, fn func(Volume, *Rotation) error, next AuditNext) (Rotation, error) {
	var out Rotation
	pre := func(ctx context.Context, tx pgx.Tx) error {
		v, old, err := lockRotation(ctx, tx, volume)
		if err != nil {
			return err
		}
		r, err := updateRotation(v, old, fn)
		if err != nil {
			return err
		}
		if _, err := tx.Exec(ctx, `UPDATE volume_rotations SET released = $1, cancelling = $2, row_mac = $3 WHERE volume = $4`,
			r.Released, r.Cancelling, r.MAC, volume); err != nil {
			return err
		}
		out = r
		return nil
	}
	err := p.tx(ctx, func(ctx context.Context, tx pgx.Tx) error {
		if next == nil {
			return pre(ctx, tx)
		}
		return appendAuditTx(ctx, tx, pre, next)
	})
	if err != nil {
		return Rotation{}, fmt.Errorf("update rotation: %w", err)
	}
	return out, nil
}

// FinishRotation implements Rotations, in one transaction under the audit
// head's lock with the volume's row and then its rotation row locked: of
// two replicas confirming the same rotation, the second waits and then
// finds no rotation (ErrNotFound).
func (p *Postgres) FinishRotation(ctx context.Context, volume string, fn func(*Volume, Rotation) error, next AuditNext) (Volume, error) {
	var out Volume
	err := p.tx(ctx, func(ctx context.Context, tx pgx.Tx) error {
		return appendAuditTx(ctx, tx, func(ctx context.Context, tx pgx.Tx) error {
			old, rot, err := lockRotation(ctx, tx, volume)
			if err != nil {
				return err
			}
			v, err := finishRotation(old, rot, fn)
			if err != nil {
				return err
			}
			if _, err := tx.Exec(ctx, `UPDATE volumes SET sealed_uk = $1, rotation_pending = false, row_mac = $2 WHERE id = $3`, v.SealedUK, v.MAC, volume); err != nil {
				return err
			}
			if _, err := tx.Exec(ctx, `DELETE FROM volume_rotations WHERE volume = $1`, volume); err != nil {
				return err
			}
			out = v
			return nil
		}, next)
	})
	if err != nil {
		return Volume{}, fmt.Errorf("finish rotation: %w", err)
	}
	return out, nil
}

// RekeyRotations implements Rotations, with the rotation rows locked
// (FOR UPDATE) until the new sealed keys are stored.
func (p *Postgres) RekeyRotations(ctx context.Context, fn func(*Rotation) error) (int, error) {
	n := 0
	err := p.tx(ctx, func(ctx context.Context, tx pgx.Tx) error {
		n = 0
		rots, err := pgx.CollectRows(mustQuery(tx.Query(ctx, `SELECT `+rotationColumns+` FROM volume_rotations ORDER BY volume FOR UPDATE`)),
			func(r pgx.CollectableRow) (Rotation, error) { return pgRotation(r) })
		if err != nil {
			return err
		}
		for _, r := range rots {
			if err := rekeyRotation(r, fn, func(r Rotation) error {
				_, err := tx.Exec(ctx, `UPDATE volume_rotations SET sealed_uk = $1, row_mac = $2 WHERE volume = $3`, r.SealedUK, r.MAC, r.Volume)
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
func (p *Postgres) ListRotations(ctx context.Context) ([]Rotation, error) {
	rots, err := pgList(ctx, p, pgRotation, `SELECT `+rotationColumns+` FROM volume_rotations ORDER BY volume`)
	if err != nil {
		return nil, fmt.Errorf("list rotations: %w", err)
	}
	return rots, nil
}

// PendingRotations implements Rotations.
func (p *Postgres) PendingRotations(ctx context.Context) (map[string]time.Time, error) {
	rots, err := pgList(ctx, p, func(r pgx.Row) (Rotation, error) {
		var (
			x       Rotation
			started int64
		)
		err := r.Scan(&x.Volume, &started)
		x.Started = fromNS(started)
		return x, err
	}, `SELECT volume, started_ns FROM volume_rotations`)
	if err != nil {
		return nil, fmt.Errorf("list rotations: %w", err)
	}
	out := make(map[string]time.Time, len(rots))
	for _, r := range rots {
		out[r.Volume] = r.Started
	}
	return out, nil
}
