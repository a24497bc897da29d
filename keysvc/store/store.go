// Package store owns the key service's persistent records: enrolled VMs,
// volumes and their sealed unwrap keys, used challenge IDs, the rows of the
// audit chain, and the events VMs report. It defines the Store interface the key service depends on
// (and Backend, what the service needs beyond it), with two implementations:
// SQLite (modernc.org/sqlite, pure Go) at DIR/keysvc.db, the embedded
// default, and PostgreSQL (pgx), which several key service replicas share.
// Each has its own migrations (migrations/ and migrations/postgres/); one
// conformance suite runs the store tests against both.
//
// It does not own cryptography: sealed unwrap keys arrive already sealed
// (package keysvc/masterkey), and audit hashes and MACs are computed by
// package keysvc/audit. The store keeps those bytes and provides the
// transactions that make them safe.
//
// # Shape of the interface
//
// Store is the union of five small interfaces, one per record kind: VMs,
// Volumes, Challenges, AuditLog and Events, each of two to four methods. A
// consumer takes the narrowest one it needs (the audit log takes an
// AuditLog, the challenge checker a Challenges), so fakes stay small and no
// package sees more than it uses. Generic Get/Put/Delete over an untyped record kind was
// considered and rejected: it moves type checks to run time and hides the
// operations that need transactional guarantees.
//
// Those operations are read-modify-write: UpdateVM and UpdateVolume run a
// caller's function on the current record inside one write transaction, so
// (for example) consuming an armed learn mode or erasing a volume happens
// exactly once even with several replicas on one database. AppendAudit does
// the same for the chain: it reads the last record and the head and writes the
// next record and the new head atomically, so the chain cannot fork.
//
// The PostgreSQL implementation gets the same guarantees from its own
// primitives, across processes: UpdateVM/UpdateVolume as SELECT … FOR UPDATE in one
// transaction, UseChallenge as INSERT … ON CONFLICT DO NOTHING, and
// AppendAudit by locking the audit_head row with SELECT … FOR UPDATE before
// reading the last record (its migration creates that row up front, so
// that there is always one to lock, even before the first record).
//
// All methods take a context first, are safe for concurrent use, and report
// missing and duplicate records with ErrNotFound and ErrExists (wrapped;
// test with errors.Is).
package store

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"time"
)

// Sentinel errors, wrapped with context by every implementation.
var (
	ErrNotFound = errors.New("not found")
	ErrExists   = errors.New("already exists")
	// ErrNewerSchema means the database was migrated by a newer keysvc.
	ErrNewerSchema = errors.New("database schema is newer than this keysvc")
	// ErrImmutable means an update tried to change a field that never
	// changes (a name, an ID, a creation time) or to restore an erased key.
	ErrImmutable = errors.New("field cannot be changed")
	// ErrChallengeUsed means a challenge ID was already recorded as used:
	// a replay. It wraps ErrExists.
	ErrChallengeUsed = fmt.Errorf("challenge already used (a replay): %w", ErrExists)
	// ErrReadAfterAppend means AppendAuditUsingThenRead committed its
	// record but the read after it failed; the error wraps the read's.
	ErrReadAfterAppend = errors.New("the audit record is committed, but the read after it failed")
)

// Store is everything the key service persists. Implementations: SQLite
// (OpenSQLite) and PostgreSQL (OpenPostgres); Open picks one.
type Store interface {
	VMs
	Volumes
	Challenges
	AuditLog
	Events
	io.Closer
}

// VM is an enrolled virtual machine.
type VM struct {
	Name     string
	EKPubPEM string // the TPM's endorsement key, PEM
	AKPubPEM string // an enrolled attestation key, PEM; "" if none
	// ProvisioningAllowed lets the VM have keysvc create a UK for a blank
	// volume on first boot.
	ProvisioningAllowed bool
	Revoked             bool
	// Policy is the VM's attestation policy as JSON (package attest defines
	// it); the store checks only that it is valid JSON. Empty means "{}".
	Policy json.RawMessage
	// LearnArmed makes the next otherwise-valid attestation's PCRs the policy.
	LearnArmed bool
	// MAC authenticates the fields above that decide a release; the key
	// service computes and checks it (the store keeps the bytes as given).
	MAC     []byte
	Created time.Time // set by the store
	Updated time.Time // set by the store on every write
}

// VMs stores enrolled VMs. A VM is never deleted: revoke it instead.
type VMs interface {
	// CreateVM stores a new VM; ErrExists if the name is taken.
	CreateVM(ctx context.Context, vm VM) (VM, error)
	// GetVM returns the named VM, or ErrNotFound.
	GetVM(ctx context.Context, name string) (VM, error)
	// UpdateVM applies fn to the named VM inside one write transaction and
	// stores the result; ErrNotFound if there is none. If fn returns an
	// error, nothing is written and that error is returned. fn must not
	// change Name or Created (ErrImmutable) and must not block.
	UpdateVM(ctx context.Context, name string, fn func(*VM) error) (VM, error)
	// ListVMs returns all VMs ordered by name.
	ListVMs(ctx context.Context) ([]VM, error)
}

// Volume is a protected volume and its unwrap key (UK), sealed under the
// master key with the volume ID as additional data.
type Volume struct {
	ID       string
	VM       string // the VM allowed to unlock it
	SealedUK []byte // nil once erased
	ErasedAt time.Time
	// MAC authenticates ID, VM, the erased state and the rotation state;
	// the key service computes and checks it (the store keeps the bytes as
	// given).
	MAC     []byte
	Created time.Time // set by the store
	// Rotation is the generation of the latest unwrap-key rotation begun
	// on the volume (0: none yet), and RotationPending says it waits for
	// the VM; only the Rotations methods change them (UpdateVolume refuses
	// with ErrImmutable). A pending rotation row must name this
	// generation, so that one kept from an earlier rotation is refused.
	Rotation        uint64
	RotationPending bool
	// RotationRow says whether a pending rotation row exists for the
	// volume. Only the unlock path's reads (GetVMAndVolume and the reads
	// after an append) set it, in the same query as the volume, so that an
	// unlock reads the row only when there is one; it is not stored.
	RotationRow bool
}

// Erased reports whether the volume's UK has been destroyed.
func (v Volume) Erased() bool { return v.SealedUK == nil }

// Volumes stores volumes. A volume is never deleted: erasing keeps the row
// (without the key) so that unlock can answer "erased".
type Volumes interface {
	// CreateVolume stores a new volume with its sealed UK; ErrExists if the
	// ID is taken, ErrNotFound if its VM is not enrolled.
	CreateVolume(ctx context.Context, v Volume) (Volume, error)
	// GetVolume returns the volume, or ErrNotFound.
	GetVolume(ctx context.Context, id string) (Volume, error)
	// UpdateVolume applies fn inside one write transaction, as UpdateVM.
	// fn must not change ID, VM or Created, and cannot give an erased
	// volume a key again (ErrImmutable). Setting SealedUK to nil erases the
	// volume; the store stamps ErasedAt and scrubs the old bytes as far as
	// the engine allows (see the implementation).
	UpdateVolume(ctx context.Context, id string, fn func(*Volume) error) (Volume, error)
	// ListVolumes returns the volumes of the named VM, or of all VMs if vm
	// is "", ordered by ID.
	ListVolumes(ctx context.Context, vm string) ([]Volume, error)
}

// Challenges records used challenge IDs so that a replayed challenge is
// refused by any replica.
type Challenges interface {
	// UseChallenge records id as used until expires; ErrChallengeUsed if
	// it was already used (a replay).
	UseChallenge(ctx context.Context, id string, expires time.Time) error
	// ChallengeUsed reports whether id is recorded as used. It is a cheap
	// early answer to a replay; only UseChallenge and AppendAuditUsing
	// decide one, atomically.
	ChallengeUsed(ctx context.Context, id string) (bool, error)
	// PurgeChallenges forgets IDs whose expiry is at or before now and
	// returns how many it removed.
	PurgeChallenges(ctx context.Context, now time.Time) (int64, error)
}

// ChallengeUse is a challenge ID to record as used until Expires.
type ChallengeUse struct {
	ID      string
	Expires time.Time
}

// AuditRecord is one stored row of the audit chain. The store keeps the bytes
// as given; package audit computes and checks Hash and MAC.
type AuditRecord struct {
	Seq      uint64
	Time     time.Time
	Actor    string
	Action   string
	Subject  string
	Details  []byte // JSON
	PrevHash []byte
	Hash     []byte
	MAC      []byte
}

// AuditHead is the chain's MAC'd anchor: the last record's seq and hash.
type AuditHead struct {
	Seq  uint64
	Hash []byte
	MAC  []byte
}

// AuditNext is what AppendAudit runs to make the next record and head.
type AuditNext = func(last *AuditRecord, head *AuditHead) (AuditRecord, AuditHead, error)

// AuditLog stores the audit chain.
type AuditLog interface {
	// AppendAudit runs next inside one write transaction with the record of
	// highest seq and the stored head (each nil if there is none), and
	// stores the record and head it returns, atomically. next runs with
	// every other writer excluded, so the chain cannot fork; if it returns
	// an error nothing is written and that error is returned. ErrExists if
	// the record's seq is taken.
	AppendAudit(ctx context.Context, next func(last *AuditRecord, head *AuditHead) (AuditRecord, AuditHead, error)) error
	// AppendAuditUsing is AppendAudit that also records the challenge use
	// as used, in the same transaction: both are stored, or neither. If
	// the challenge was used already it stores nothing and returns
	// ErrChallengeUsed. The key service records an unlock's release (or
	// refusal) this way, so an unlock waits for one durable write, not two.
	AppendAuditUsing(ctx context.Context, use ChallengeUse, next func(last *AuditRecord, head *AuditHead) (AuditRecord, AuditHead, error)) error
	// ScanAudit reads the stored head (nil if there is none) and calls fn
	// for each record with seq >= from, in seq order, all from one
	// consistent snapshot, so that a concurrent append cannot make the head
	// and the records disagree. It stops at fn's first error and returns it.
	ScanAudit(ctx context.Context, from uint64, fn func(AuditRecord) error) (*AuditHead, error)
}
