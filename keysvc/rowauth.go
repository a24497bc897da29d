package keysvc

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"hash"
	"sync"

	"github.com/awnumar/memguard"

	"github.com/keygate/keygate/keysvc/store"
)

// Row authentication (issue 12, item 2). Someone who can write keysvc.db
// but does not hold the master key must not be able to get a key released:
// without this, swapping a VM's EK, AK and policy for those of a TPM they
// control would release that VM's UK to them, and the audit would show a
// normal unlock. So every row that decides a release carries a MAC under
// a sub-key of the master key (masterkey.LabelRowMAC), computed on every write that
// goes through the Server and checked on every read that decides a
// release; and a volume's sealed UK is bound, as AEAD additional data, to
// its volume ID, its owner VM and that VM's EK fingerprint (ukRecordID), so
// that a sealed UK moved to another row, or a row pointed at another EK,
// does not open.
//
// What it does not stop: a database writer replaying an older genuine row
// with its genuine MAC (un-revoking a VM, restoring an erased volume's row
// from a backup), or deleting rows. docs/threat-model.md says more.

// Domains of the row MACs: one per record kind, so that no encoding of one
// kind can be taken for another.
const (
	vmRowDomain     = "keygate vm row v1\x00"
	volumeRowDomain = "keygate volume row v1\x00"
	// A volume that has begun a rotation also covers its rotation
	// generation and pending flag (rotationauth.go); one that never did
	// keeps the v1 encoding, so that its MAC stays valid.
	volumeRowDomainV2 = "keygate volume row v2\x00"
	rotationRowDomain = "keygate rotation row v1\x00"
	anchorDomain      = "keygate store anchor v1\x00"
)

// ErrTampered is wrapped by the error of a read or update whose stored row
// fails its integrity check (a TamperError says which row).
var ErrTampered = errors.New("stored record fails its integrity check")

// TamperError names a row that failed its integrity check.
type TamperError struct {
	Kind string // "vm" or "volume"
	Name string
	// Detail says what failed, for the operator.
	Detail string
}

func (e *TamperError) Error() string {
	return fmt.Sprintf("%s %q: %s: %v (it was changed outside the key service; run `keysvc audit verify`, and restore the database from a backup or re-enroll)", e.Kind, e.Name, e.Detail, ErrTampered)
}

func (e *TamperError) Is(target error) bool { return target == ErrTampered }

// rowKey computes and checks row MACs. Its key lives in locked memory.
//
// Every unlock checks four rows (a VM and its volume, before the release
// and again after it), so the HMAC states are pooled rather than built per
// call: building one (key padding, two SHA-256 states) cost more than the
// MAC itself. The price is that pooled states keep the key's padded copies
// on the Go heap for the service's life, as the session key already is; it
// is a MAC key (it forges rows, it opens nothing), and memory access to the
// service exposes the master key anyway.
type rowKey struct {
	key  *memguard.LockedBuffer
	pool *sync.Pool // of hash.Hash: hmac.New(sha256.New, key)
}

func newRowKey(key *memguard.LockedBuffer) rowKey {
	return rowKey{key: key, pool: &sync.Pool{New: func() any { return hmac.New(sha256.New, key.Bytes()) }}}
}

func (k rowKey) sum(domain string, fields ...[]byte) []byte {
	m := k.pool.Get().(hash.Hash)
	defer k.pool.Put(m)
	m.Reset()
	m.Write([]byte(domain))
	var n [4]byte
	for _, f := range fields {
		binary.BigEndian.PutUint32(n[:], uint32(len(f)))
		m.Write(n[:])
		m.Write(f)
	}
	return m.Sum(nil)
}

func flag(b bool) []byte {
	if b {
		return []byte{1}
	}
	return []byte{0}
}

// vmMAC covers everything of a VM that decides a release: name, EK, AK,
// provisioning, revoked, policy (as stored; "" as the store keeps it,
// "{}") and learn state. Not the times, which decide nothing.
func (k rowKey) vmMAC(v store.VM) []byte {
	pol := v.Policy
	if len(pol) == 0 {
		pol = []byte("{}")
	}
	return k.sum(vmRowDomain, []byte(v.Name), []byte(v.EKPubPEM), []byte(v.AKPubPEM),
		flag(v.ProvisioningAllowed), flag(v.Revoked), pol, flag(v.LearnArmed))
}

// volumeMAC covers a volume's ID, owner, erased state and rotation state
// (generation and pending flag, once it has begun a rotation). The sealed
// UK is bound to the first two by its own AEAD (ukRecordID).
func (k rowKey) volumeMAC(v store.Volume) []byte {
	if v.Rotation == 0 && !v.RotationPending {
		return k.sum(volumeRowDomain, []byte(v.ID), []byte(v.VM), flag(v.Erased()))
	}
	return k.sum(volumeRowDomainV2, []byte(v.ID), []byte(v.VM), flag(v.Erased()),
		binary.BigEndian.AppendUint64(nil, v.Rotation), flag(v.RotationPending))
}

func (k rowKey) anchorMAC(a store.Anchor) []byte {
	return k.sum(anchorDomain, binary.BigEndian.AppendUint64(nil, uint64(a.Created.UnixNano())),
		binary.BigEndian.AppendUint64(nil, a.GenesisSeq), a.GenesisHash)
}

func (k rowKey) checkVM(v store.VM) error {
	if len(v.MAC) == 0 {
		return &TamperError{Kind: "vm", Name: v.Name, Detail: "the row has no MAC"}
	}
	if !hmac.Equal(k.vmMAC(v), v.MAC) {
		return &TamperError{Kind: "vm", Name: v.Name, Detail: "the MAC does not match its EK, AK, policy, revoked or learn state"}
	}
	return nil
}

func (k rowKey) checkVolume(v store.Volume) error {
	if len(v.MAC) == 0 {
		return &TamperError{Kind: "volume", Name: v.ID, Detail: "the row has no MAC"}
	}
	if !hmac.Equal(k.volumeMAC(v), v.MAC) {
		return &TamperError{Kind: "volume", Name: v.ID, Detail: "the MAC does not match its owner VM, erased state or rotation state"}
	}
	return nil
}

// ukRecordID is the record ID a volume's UK is sealed under (the AEAD's
// additional data): the volume ID, its owner VM and that VM's EK
// fingerprint (hex). IDs and names cannot hold NUL, so the join is
// unambiguous. Stores from before row MACs sealed under the volume ID
// alone; adoption re-seals them (adopt.go).
func ukRecordID(volume, vm, ekFingerprint string) string {
	return "uk v2\x00" + volume + "\x00" + vm + "\x00" + ekFingerprint
}

// authStore is the Server's view of its Store: it MACs the rows it writes
// and checks the rows it reads (VMs and volumes; lists pass through
// unchecked, since they decide nothing and an operator must be able to see
// a tampered row). An update checks the row before applying the change, so
// that an administrator's change cannot re-MAC a tampered row.
type authStore struct {
	Store
	k *keyring
}

func (a *authStore) CreateVM(ctx context.Context, vm store.VM) (store.VM, error) {
	if len(vm.Policy) == 0 {
		vm.Policy = []byte("{}")
	}
	vm.MAC = a.k.vmMAC(vm)
	return a.Store.CreateVM(ctx, vm)
}

func (a *authStore) GetVM(ctx context.Context, name string) (store.VM, error) {
	vm, err := a.Store.GetVM(ctx, name)
	if err != nil {
		return vm, err
	}
	if err := a.k.checkVM(vm); err != nil {
		return vm, fmt.Errorf("get vm: %w", err)
	}
	return vm, nil
}

func (a *authStore) UpdateVM(ctx context.Context, name string, fn func(*store.VM) error) (store.VM, error) {
	return a.Store.UpdateVM(ctx, name, func(v *store.VM) error {
		if err := a.k.checkVM(*v); err != nil {
			return err
		}
		if err := fn(v); err != nil {
			return err
		}
		if len(v.Policy) == 0 {
			v.Policy = []byte("{}")
		}
		v.MAC = a.k.vmMAC(*v)
		return nil
	})
}

func (a *authStore) CreateVolume(ctx context.Context, v store.Volume) (store.Volume, error) {
	v.MAC = a.k.volumeMAC(v)
	return a.Store.CreateVolume(ctx, v)
}

func (a *authStore) GetVolume(ctx context.Context, id string) (store.Volume, error) {
	v, err := a.Store.GetVolume(ctx, id)
	if err != nil {
		return v, err
	}
	if err := a.k.checkVolume(v); err != nil {
		return v, fmt.Errorf("get volume: %w", err)
	}
	return v, nil
}

func (a *authStore) UpdateVolume(ctx context.Context, id string, fn func(*store.Volume) error) (store.Volume, error) {
	return a.Store.UpdateVolume(ctx, id, func(v *store.Volume) error {
		if err := a.k.checkVolume(*v); err != nil {
			return err
		}
		if err := fn(v); err != nil {
			return err
		}
		v.MAC = a.k.volumeMAC(*v)
		return nil
	})
}

// GetVMAndVolume reads both in one query where the store can (one MAC check
// per row, no extra round trip), and checks both.
func (a *authStore) GetVMAndVolume(ctx context.Context, vmName, id string) (store.VM, *store.Volume, error) {
	var (
		vm  store.VM
		vol *store.Volume
		err error
	)
	if r, ok := a.Store.(vmVolumeReader); ok {
		vm, vol, err = r.GetVMAndVolume(ctx, vmName, id)
	} else {
		vm, err = a.Store.GetVM(ctx, vmName)
		if err == nil {
			var v store.Volume
			v, err = a.Store.GetVolume(ctx, id)
			if err == nil {
				// Whether a rotation row exists is not known here: let
				// the unlock read it (see pendingBlob).
				v.RotationRow = true
				vol = &v
			} else if errors.Is(err, store.ErrNotFound) {
				err = nil
			}
		}
	}
	if err != nil {
		return vm, vol, err
	}
	return vm, vol, a.checkVMAndVolume(vm, vol)
}

// GetVMAndVolumeUsing is GetVMAndVolume that also reports whether challenge
// is used, in the same query where the store can.
func (a *authStore) GetVMAndVolumeUsing(ctx context.Context, vmName, id, challenge string) (store.VM, *store.Volume, bool, error) {
	r, ok := a.Store.(vmVolumeChallengeReader)
	if !ok {
		vm, vol, err := a.GetVMAndVolume(ctx, vmName, id)
		if err != nil {
			return vm, vol, false, err
		}
		used, err := a.Store.ChallengeUsed(ctx, challenge)
		return vm, vol, used, err
	}
	vm, vol, used, err := r.GetVMAndVolumeUsing(ctx, vmName, id, challenge)
	if err != nil {
		return vm, vol, used, err
	}
	return vm, vol, used, a.checkVMAndVolume(vm, vol)
}

// AppendAuditUsingThenRead is the store's, with the rows read checked.
// Server.appendReader offers it only over a store that has one.
func (a *authStore) AppendAuditUsingThenRead(ctx context.Context, use store.ChallengeUse, next store.AuditNext, vmName, id string) (store.VM, *store.Volume, error) {
	r, ok := a.Store.(appendThenReader)
	if !ok {
		return store.VM{}, nil, errors.New("append and read: the store cannot")
	}
	vm, vol, err := r.AppendAuditUsingThenRead(ctx, use, next, vmName, id)
	if err != nil {
		return vm, vol, err
	}
	if err := a.checkVMAndVolume(vm, vol); err != nil {
		return vm, vol, fmt.Errorf("%w: %w", store.ErrReadAfterAppend, err)
	}
	return vm, vol, nil
}

func (a *authStore) checkVMAndVolume(vm store.VM, vol *store.Volume) error {
	if err := a.k.checkVM(vm); err != nil {
		return err
	}
	if vol != nil {
		return a.k.checkVolume(*vol)
	}
	return nil
}
