package store

import (
	"context"
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
