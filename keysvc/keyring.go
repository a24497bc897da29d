package keysvc

import (
	"fmt"
	"sync/atomic"

	"github.com/keygate/keygate/keysvc/masterkey"
	"github.com/keygate/keygate/keysvc/store"
)

// keyring is the master key the Server seals and MACs under, and during a
// master-key rotation (masterkey_rotate.go) the previous one, which still opens and
// checks the rows not yet re-keyed. Every write uses the current key;
// every read accepts either, so that each row stays readable while a
// rotation moves it, and none opens under the previous key once the
// rotation has ended (it is wiped then).
type keyring struct {
	p atomic.Pointer[ringKeys]
}

type ringKeys struct {
	cur      MasterKey
	curFP    string
	rows     rowKey
	prev     MasterKey // nil unless a rotation is under way
	prevRows *rowKey
}

// newRingKeys derives the row MAC key of mk.
func newRingKeys(mk MasterKey) (*ringKeys, error) {
	rk, err := mk.Derive(masterkey.LabelRowMAC)
	if err != nil {
		return nil, fmt.Errorf("row MAC key: %w", err)
	}
	fp, err := masterkey.Fingerprint(mk)
	if err != nil {
		rk.Destroy()
		return nil, err
	}
	return &ringKeys{cur: mk, curFP: fp, rows: newRowKey(rk)}, nil
}

func (k *keyring) load() *ringKeys { return k.p.Load() }

// fingerprint names the current master key.
func (k *keyring) fingerprint() string { return k.load().curFP }

// seal seals under the current key.
func (k *keyring) seal(recordID string, pt []byte) ([]byte, error) {
	return k.load().cur.Seal(recordID, pt)
}

func (k *keyring) vmMAC(v store.VM) []byte         { return k.load().rows.vmMAC(v) }
func (k *keyring) volumeMAC(v store.Volume) []byte { return k.load().rows.volumeMAC(v) }

// check runs fn under the current row key and, if that fails, the
// previous one.
func (k *keyring) check(fn func(rowKey) error) error {
	ks := k.load()
	err := fn(ks.rows)
	if err != nil && ks.prevRows != nil && fn(*ks.prevRows) == nil {
		return nil
	}
	return err
}

func (k *keyring) checkVM(v store.VM) error {
	return k.check(func(r rowKey) error { return r.checkVM(v) })
}

func (k *keyring) checkVolume(v store.Volume) error {
	return k.check(func(r rowKey) error { return r.checkVolume(v) })
}

func (k *keyring) checkAnchor(a store.Anchor) error {
	return k.check(func(r rowKey) error { return r.checkAnchor(a) })
}

// destroy wipes the row MAC keys (the master keys belong to the caller).
func (k *keyring) destroy() {
	ks := k.load()
	if ks == nil {
		return
	}
	ks.rows.key.Destroy()
	if ks.prevRows != nil {
		ks.prevRows.key.Destroy()
	}
}
