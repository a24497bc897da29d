package store

import (
	"bytes"
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
func (p *Postgres) StartRotation(ctx context.Context, r Rotation, next AuditNext) (Rotation, error) {
	if len(r.SealedUK) == 0 {
		return Rotation{}, fmt.Errorf("start rotation of volume %q: no sealed key", r.Volume)
	}
	r.Started = time.Now().UTC()
	r.SealedUK = bytes.Clone(r.SealedUK)
	err := p.tx(ctx, func(ctx context.Context, tx pgx.Tx) error {
		return appendAuditTx(ctx, tx, func(ctx context.Context, tx pgx.Tx) error {
			var sealed []byte
			err := tx.QueryRow(ctx, `SELECT sealed_uk FROM volumes WHERE id = $1 FOR UPDATE`, r.Volume).Scan(&sealed)
			if isNoRowsPG(err) {
				return fmt.Errorf("volume %q: %w", r.Volume, ErrNotFound)
			}
			if err != nil {
				return err
			}
			if len(sealed) == 0 {
				return fmt.Errorf("volume %q is erased; there is no key to rotate: %w", r.Volume, ErrImmutable)
			}
			tag, err := tx.Exec(ctx, `INSERT INTO volume_rotations (volume, sealed_uk, started_ns) VALUES ($1, $2, $3) ON CONFLICT (volume) DO NOTHING`,
				r.Volume, r.SealedUK, ns(r.Started))
			if err != nil {
				return err
			}
			if tag.RowsAffected() == 0 {
				return fmt.Errorf("volume %q has a rotation pending already: %w", r.Volume, ErrExists)
			}
			return nil
		}, next)
	})
	if err != nil {
		return Rotation{}, fmt.Errorf("start rotation: %w", err)
	}
	return r, nil
}

func pgRotation(r pgx.Row) (Rotation, error) {
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
func (p *Postgres) GetRotation(ctx context.Context, volume string) (Rotation, error) {
	ctx, cancel := bound(ctx)
	defer cancel()
	r, err := pgRotation(p.pool.QueryRow(ctx, `SELECT volume, sealed_uk, started_ns FROM volume_rotations WHERE volume = $1`, volume))
	if isNoRowsPG(err) {
		return Rotation{}, fmt.Errorf("rotation of volume %q: %w", volume, ErrNotFound)
	}
	if err != nil {
		return Rotation{}, fmt.Errorf("get rotation of volume %q: %w", volume, classify(err))
	}
	return r, nil
}

// FinishRotation implements Rotations, in one transaction under the audit
// head's lock with the volume's row and then its rotation row locked: of
// two replicas confirming the same rotation, the second waits and then
// finds no rotation (ErrNotFound).
func (p *Postgres) FinishRotation(ctx context.Context, volume string, fn func(*Volume, Rotation) error, next AuditNext) (Volume, error) {
	var out Volume
	err := p.tx(ctx, func(ctx context.Context, tx pgx.Tx) error {
		return appendAuditTx(ctx, tx, func(ctx context.Context, tx pgx.Tx) error {
			old, err := pgVolume(tx.QueryRow(ctx, `SELECT `+volumeColumns+` FROM volumes WHERE id = $1 FOR UPDATE`, volume))
			if isNoRowsPG(err) {
				return fmt.Errorf("rotation of volume %q: %w", volume, ErrNotFound)
			}
			if err != nil {
				return fmt.Errorf("read volume %q: %w", volume, err)
			}
			rot, err := pgRotation(tx.QueryRow(ctx, `SELECT volume, sealed_uk, started_ns FROM volume_rotations WHERE volume = $1 FOR UPDATE`, volume))
			if isNoRowsPG(err) {
				return fmt.Errorf("rotation of volume %q: %w", volume, ErrNotFound)
			}
			if err != nil {
				return err
			}
			v, err := finishRotation(old, rot, fn)
			if err != nil {
				return err
			}
			if _, err := tx.Exec(ctx, `UPDATE volumes SET sealed_uk = $1, row_mac = $2 WHERE id = $3`, v.SealedUK, v.MAC, volume); err != nil {
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
		rots, err := pgx.CollectRows(mustQuery(tx.Query(ctx, `SELECT volume, sealed_uk, started_ns FROM volume_rotations ORDER BY volume FOR UPDATE`)),
			func(r pgx.CollectableRow) (Rotation, error) { return pgRotation(r) })
		if err != nil {
			return err
		}
		for _, r := range rots {
			if err := rekeyRotation(r, fn, func(r Rotation) error {
				_, err := tx.Exec(ctx, `UPDATE volume_rotations SET sealed_uk = $1 WHERE volume = $2`, r.SealedUK, r.Volume)
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
