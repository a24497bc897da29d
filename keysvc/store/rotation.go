package store

import (
	"bytes"
	"context"
	"fmt"
	"time"
)

// Rotation is a volume's pending unwrap key (issue 15): made by `keysvc
// volume rotate`, released next to the current one, and made the volume's
// own once the VM proves it holds it (or dropped by a cancel). The store
// keeps the sealed bytes and the MAC as given; the key service seals,
// opens, MACs and checks them.
type Rotation struct {
	Volume string
	// Generation is the volume's rotation this key belongs to: the
	// volume's Rotation when it was begun. A row whose generation is not
	// the volume's, or whose volume has no rotation pending, was kept from
	// an earlier rotation and put back.
	Generation uint64
	SealedUK   []byte
	// Released says the pending UK was sent to the VM at least once: the
	// VM may have re-keyed its image to it, so a cancel must wait for the
	// VM to say which key it holds.
	Released bool
	// Cancelling says an operator cancelled the rotation after its key was
	// released; the VM's next confirmation says which key stays.
	Cancelling bool
	// MAC authenticates Volume, Generation, SealedUK, Released and
	// Cancelling (the key service computes and checks it).
	MAC     []byte
	Started time.Time // set by the store
}

// RotationStart makes a volume's pending rotation in StartRotation: v is
// the volume as stored and r the new rotation (Volume and Started set).
// It must check v, give v the next generation (v.Rotation+1) with
// RotationPending set, give r that generation, a sealed key and a MAC, and
// give v its new MAC; nothing else may change (ErrImmutable).
type RotationStart = func(v *Volume, r *Rotation) error

// Rotations stores pending unwrap keys. It is apart from Store so that a
// backend without it still builds; the key service asks for it with a type
// assertion and answers "not supported" where it is missing. A backend that
// implements it must also delete a volume's pending UK when the volume is
// erased (UpdateVolume setting SealedUK to nil), in the same transaction:
// crypto-erase destroys both keys.
type Rotations interface {
	// StartRotation reads the volume, runs fn (RotationStart) and stores
	// the volume and the rotation it made, with the audit record next
	// makes, in one write transaction. ErrNotFound if the volume does not
	// exist, ErrImmutable if it is erased, ErrExists if it has a rotation
	// row already. fn must not block; if it fails nothing is written.
	StartRotation(ctx context.Context, volume string, fn RotationStart, next AuditNext) (Rotation, error)
	// GetRotation returns the volume's pending rotation, or ErrNotFound.
	GetRotation(ctx context.Context, volume string) (Rotation, error)
	// UpdateRotation, in one write transaction, reads the volume and its
	// pending rotation, runs fn with both, and stores the rotation's
	// Released, Cancelling and MAC as fn set them (nothing else may
	// change: ErrImmutable), with the audit record next makes if next is
	// not nil. ErrNotFound if no rotation is pending. fn must not block;
	// if it fails nothing is written.
	UpdateRotation(ctx context.Context, volume string, fn func(v Volume, r *Rotation) error, next AuditNext) (Rotation, error)
	// FinishRotation ends a rotation, completed or cancelled: in one write
	// transaction it reads the volume and its pending rotation, calls fn
	// with both, stores the volume's SealedUK, RotationPending (which fn
	// must clear) and MAC as fn set them (nothing else may change:
	// ErrImmutable), deletes the rotation and appends the audit record
	// next makes: all of it, or none. A completion sets the pending key as
	// the volume's; a cancel keeps the volume's key. ErrNotFound if no
	// rotation is pending. fn must not block; if it returns an error
	// nothing is written.
	FinishRotation(ctx context.Context, volume string, fn func(v *Volume, r Rotation) error, next AuditNext) (Volume, error)
	// PendingRotations returns when each pending rotation started, by
	// volume ID.
	PendingRotations(ctx context.Context) (map[string]time.Time, error)
	// ListRotations returns every pending rotation, ordered by volume, for
	// checks (`keysvc audit verify`).
	ListRotations(ctx context.Context) ([]Rotation, error)
	// RekeyRotations runs fn on every pending rotation in one write
	// transaction and stores the SealedUK and MAC it sets (a master-key
	// rotation re-seals and re-MACs the pending UKs with the rest); if fn
	// fails nothing is written. It returns how many it re-sealed.
	RekeyRotations(ctx context.Context, fn func(*Rotation) error) (int, error)
}

// rotationColumns are volume_rotations' columns, as scanRotation and
// pgRotation read them (the same names in both schemas).
const rotationColumns = `volume, sealed_uk, started_ns, generation, released, cancelling, row_mac`

// startRotation runs fn on the stored volume and a new rotation, and checks
// what it changed (StartRotation on either engine).
func startRotation(old Volume, fn RotationStart) (Volume, Rotation, error) {
	if old.Erased() {
		return Volume{}, Rotation{}, fmt.Errorf("volume %q is erased; there is no key to rotate: %w", old.ID, ErrImmutable)
	}
	v := old
	v.SealedUK = bytes.Clone(old.SealedUK)
	r := Rotation{Volume: old.ID, Started: time.Now().UTC()}
	if err := fn(&v, &r); err != nil {
		return Volume{}, Rotation{}, err
	}
	if v.ID != old.ID || v.VM != old.VM || !v.Created.Equal(old.Created) || !bytes.Equal(v.SealedUK, old.SealedUK) ||
		v.Rotation != old.Rotation+1 || !v.RotationPending || r.Volume != old.ID || r.Generation != v.Rotation ||
		len(r.SealedUK) == 0 || r.Released || r.Cancelling {
		return Volume{}, Rotation{}, fmt.Errorf("volume %q: a new rotation takes the next generation and changes nothing else: %w", old.ID, ErrImmutable)
	}
	r.SealedUK = bytes.Clone(r.SealedUK)
	return v, r, nil
}

// updateRotation runs fn and checks that only Released, Cancelling and the
// MAC changed (UpdateRotation on either engine).
func updateRotation(v Volume, old Rotation, fn func(Volume, *Rotation) error) (Rotation, error) {
	r := old
	r.SealedUK = bytes.Clone(old.SealedUK)
	if err := fn(v, &r); err != nil {
		return Rotation{}, err
	}
	if r.Volume != old.Volume || r.Generation != old.Generation || !bytes.Equal(r.SealedUK, old.SealedUK) || !r.Started.Equal(old.Started) {
		return Rotation{}, fmt.Errorf("rotation of volume %q: only its released and cancelling state may change: %w", old.Volume, ErrImmutable)
	}
	return r, nil
}

// finishRotation passes fn the volume and its pending rotation and checks
// that only the sealed key, the pending flag (cleared) and the MAC changed
// (FinishRotation on either engine).
func finishRotation(old Volume, rot Rotation, fn func(*Volume, Rotation) error) (Volume, error) {
	v := old
	v.SealedUK = bytes.Clone(old.SealedUK)
	if err := fn(&v, rot); err != nil {
		return Volume{}, err
	}
	if v.ID != old.ID || v.VM != old.VM || !v.Created.Equal(old.Created) || !v.ErasedAt.Equal(old.ErasedAt) || len(v.SealedUK) == 0 ||
		v.Rotation != old.Rotation || v.RotationPending {
		return Volume{}, fmt.Errorf("volume %q: ending a rotation changes only the sealed key, the pending flag (cleared) and the MAC: %w", old.ID, ErrImmutable)
	}
	return v, nil
}

// rekeyRotation passes r to fn, checks that only its sealed key and MAC
// changed, and stores it with save (RekeyRotations on either engine).
func rekeyRotation(r Rotation, fn func(*Rotation) error, save func(Rotation) error) error {
	old := r
	if err := fn(&r); err != nil {
		return err
	}
	if r.Volume != old.Volume || r.Generation != old.Generation || r.Released != old.Released || r.Cancelling != old.Cancelling || len(r.SealedUK) == 0 {
		return fmt.Errorf("rekey rotation of volume %q: only its sealed key and MAC may change: %w", old.Volume, ErrImmutable)
	}
	return save(r)
}
