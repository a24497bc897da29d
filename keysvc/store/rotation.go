package store

import (
	"bytes"
	"context"
	"fmt"
	"time"
)

// Rotation is a volume's pending unwrap key (issue 15): made by `keysvc
// volume rotate`, released next to the current one, and made the volume's
// own once the VM proves it holds it. The store keeps the sealed bytes as
// given; the key service seals and opens them.
type Rotation struct {
	Volume   string
	SealedUK []byte
	Started  time.Time // set by the store
}

// Rotations stores pending unwrap keys. It is apart from Store so that a
// backend without it still builds; the key service asks for it with a type
// assertion and answers "not supported" where it is missing. A backend that
// implements it must also delete a volume's pending UK when the volume is
// erased (UpdateVolume setting SealedUK to nil), in the same transaction:
// crypto-erase destroys both keys.
type Rotations interface {
	// StartRotation stores r, and the audit record next makes, in one write
	// transaction. ErrNotFound if the volume does not exist, ErrImmutable if
	// it is erased, ErrExists if it has a rotation pending already.
	StartRotation(ctx context.Context, r Rotation, next AuditNext) (Rotation, error)
	// GetRotation returns the volume's pending rotation, or ErrNotFound.
	GetRotation(ctx context.Context, volume string) (Rotation, error)
	// FinishRotation, in one write transaction, reads the volume and its
	// pending rotation, calls fn with both, stores the volume's SealedUK
	// and MAC as fn set them (nothing else may change: ErrImmutable),
	// deletes the rotation and appends the audit record next makes: all of
	// it, or none. ErrNotFound if no rotation is pending. fn must not
	// block; if it returns an error nothing is written.
	FinishRotation(ctx context.Context, volume string, fn func(v *Volume, r Rotation) error, next AuditNext) (Volume, error)
	// PendingRotations returns when each pending rotation started, by
	// volume ID.
	PendingRotations(ctx context.Context) (map[string]time.Time, error)
	// RekeyRotations runs fn on every pending rotation in one write
	// transaction and stores the SealedUK it sets (a master-key rotation
	// re-seals the pending UKs with the rest); if fn fails nothing is
	// written. It returns how many it re-sealed.
	RekeyRotations(ctx context.Context, fn func(*Rotation) error) (int, error)
}

// finishRotation passes fn the volume and its pending rotation and checks
// that only the sealed key and the MAC changed (FinishRotation on either
// engine).
func finishRotation(old Volume, rot Rotation, fn func(*Volume, Rotation) error) (Volume, error) {
	v := old
	v.SealedUK = bytes.Clone(old.SealedUK)
	if err := fn(&v, rot); err != nil {
		return Volume{}, err
	}
	if v.ID != old.ID || v.VM != old.VM || !v.Created.Equal(old.Created) || !v.ErasedAt.Equal(old.ErasedAt) || len(v.SealedUK) == 0 {
		return Volume{}, fmt.Errorf("volume %q: a rotation changes only the sealed key and the MAC: %w", old.ID, ErrImmutable)
	}
	return v, nil
}

// rekeyRotation passes r to fn, checks that only its sealed key changed,
// and stores it with save (RekeyRotations on either engine).
func rekeyRotation(r Rotation, fn func(*Rotation) error, save func(Rotation) error) error {
	vol := r.Volume
	if err := fn(&r); err != nil {
		return err
	}
	if r.Volume != vol || len(r.SealedUK) == 0 {
		return fmt.Errorf("rekey rotation of volume %q: only its sealed key may change: %w", vol, ErrImmutable)
	}
	return save(r)
}
