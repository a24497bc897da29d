package store

import (
	"bytes"
	"context"
	"fmt"
	"time"
)

// MasterKeyRotation is the state of a master-key rotation under way (keysvc's
// masterkey_rotate.go): the fingerprints of the old and new master keys, and the
// cursors up to which rows are re-keyed. The store keeps it; the key
// service does the cryptography through the callbacks of RekeyBatch.
type MasterKeyRotation struct {
	OldKey, NewKey string // masterkey.Fingerprint of each
	Started        time.Time
	VMCursor       string // rows with Name <= VMCursor are done
	VolumeCursor   string // rows with ID <= VolumeCursor are done
	VMs, Volumes   int    // how many rows are done
}

// MasterKeyRotations stores the state of a master-key rotation. A PostgreSQL
// implementation runs each method in one transaction, with the rotation
// row locked (SELECT … FOR UPDATE) in RekeyBatch and FinishMasterKeyRotation, so
// that two replicas never re-key the same batch.
type MasterKeyRotations interface {
	// MasterKeyRotation returns the rotation under way, or nil if none.
	MasterKeyRotation(ctx context.Context) (*MasterKeyRotation, error)
	// BeginMasterKeyRotation stores r (cursors empty), stores the anchor re-MAC'd
	// by anchor (if the store has one) and appends the audit record next
	// makes, atomically; ErrExists if a rotation is under way.
	BeginMasterKeyRotation(ctx context.Context, r MasterKeyRotation, anchor func(Anchor) Anchor, next AuditNext) error
	// RekeyBatch re-keys up to limit rows past the cursors in one write
	// transaction: VMs in name order, then volumes in ID order. vm may set
	// only a VM's MAC; vol only a volume's MAC and (unless erased) its
	// sealed UK (ErrImmutable otherwise). It advances the cursors and
	// counts in the same transaction, and reports done when no row is
	// left past them. ErrNotFound if no rotation is under way.
	RekeyBatch(ctx context.Context, limit int, vm func(*VM) error, vol func(*Volume) error) (r MasterKeyRotation, done bool, err error)
	// FinishMasterKeyRotation ends the rotation, atomically: it appends the audit
	// record next makes, deletes the rotation row and records NewKey as
	// the fingerprint ClaimMasterKey returns from then on. ErrNotFound if no
	// rotation is under way.
	FinishMasterKeyRotation(ctx context.Context, next AuditNext) error
}

// remacVM passes v to fn, checks that only its MAC changed, and stores it
// with save: the step Adopt and RekeyBatch take for each VM row on either
// engine. op names the step in errors.
func remacVM(op string, v VM, fn func(*VM) error, save func(VM) error) error {
	old := v
	if err := fn(&v); err != nil {
		return err
	}
	if v.Name != old.Name || v.EKPubPEM != old.EKPubPEM || v.AKPubPEM != old.AKPubPEM || v.Revoked != old.Revoked ||
		v.LearnArmed != old.LearnArmed || v.ProvisioningAllowed != old.ProvisioningAllowed || !bytes.Equal(v.Policy, old.Policy) {
		return fmt.Errorf("%s vm %q: only its MAC may change: %w", op, old.Name, ErrImmutable)
	}
	if err := save(v); err != nil {
		return fmt.Errorf("%s vm %q: %w", op, v.Name, err)
	}
	return nil
}

// remacVolume passes v to fn, checks that only its MAC and sealed UK
// changed, and stores it with save, as remacVM does for VMs.
func remacVolume(op string, v Volume, fn func(*Volume) error, save func(Volume) error) error {
	old := v
	if err := fn(&v); err != nil {
		return err
	}
	if v.ID != old.ID || v.VM != old.VM || v.Erased() != old.Erased() || v.Rotation != old.Rotation || v.RotationPending != old.RotationPending {
		return fmt.Errorf("%s volume %q: only its MAC and sealed UK may change: %w", op, old.ID, ErrImmutable)
	}
	if err := save(v); err != nil {
		return fmt.Errorf("%s volume %q: %w", op, v.ID, err)
	}
	return nil
}
