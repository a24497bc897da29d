package store

import (
	"context"
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
	// record next makes and deletes the rotation row. ErrNotFound if no
	// rotation is under way.
	FinishMasterKeyRotation(ctx context.Context, next AuditNext) error
}
