package audit

import (
	"context"
	"crypto/hmac"
	"encoding/json"
	"fmt"

	"github.com/awnumar/memguard"

	"github.com/keygate/keygate/keysvc/masterkey"
	"github.com/keygate/keygate/keysvc/store"
)

// The audit chain across a master-key rotation.
//
// Records are append-only, so they cannot be re-MAC'd under a new key.
// Instead the chain changes key at one record: the rotation's first
// record (ActionMasterKeyRotate, phase "begin", written by AppendSwitch),
// which is MAC'd under the new K and whose hash, through prev_hash, covers
// every record before it. From it on, every record and the head are MAC'd
// under the new K. While the rotation runs the Log holds both keys, and
// Verify checks each earlier record's MAC under the old K; once the old
// master key is wiped, Verify checks the earlier records' hashes and links
// only, and counts them in Report.Retired: their authenticity then rests on
// the switch record, which no one without the new K can forge, and which
// a change to any earlier record would unlink. So whoever held only the
// old key (say, it leaked, and that is why it was rotated) cannot add,
// edit or remove a record after the switch without Verify noticing.

// ActionMasterKeyRotate records a step of a master-key rotation.
const ActionMasterKeyRotate Action = "master-key-rotate"

// Phases of MasterKeyRotate.
const (
	RotateBegin  = "begin"  // the switch record: MAC'd under the new key
	RotateResume = "resume" // a restarted service took the rotation up again
	RotateFinish = "finish" // every row is under the new key; the old key is wiped next
)

// MasterKeyRotate records a master-key rotation step. Keys are named by
// fingerprint (masterkey.Fingerprint), never by value.
type MasterKeyRotate struct {
	Phase   string `json:"phase"`
	OldKey  string `json:"old_key"`
	NewKey  string `json:"new_key"`
	Kind    string `json:"kind,omitempty"` // "file" or "pkcs11"
	VMs     int    `json:"vms,omitempty"`
	Volumes int    `json:"volumes,omitempty"`
}

func (MasterKeyRotate) auditDetails() {}

// keys are the Log's MAC keys: cur MACs new records; prev, during a
// rotation, still checks the records before the switch.
type keys struct {
	cur, prev *memguard.LockedBuffer
}

func (ks *keys) macOK(hash, m []byte) bool {
	return hmac.Equal(mac(ks.cur, hash), m) || ks.prev != nil && hmac.Equal(mac(ks.prev, hash), m)
}

func (ks *keys) headOK(h *store.AuditHead) bool {
	return hmac.Equal(headMAC(ks.cur, h.Seq, h.Hash), h.MAC) || ks.prev != nil && hmac.Equal(headMAC(ks.prev, h.Seq, h.Hash), h.MAC)
}

func (ks *keys) destroy() {
	ks.cur.Destroy()
	if ks.prev != nil {
		ks.prev.Destroy()
	}
}

// AppendSwitch appends ev, the rotation's begin record, as the record
// that moves the chain to next's K: it is MAC'd under it, and so is every
// record after it. via runs it as AppendVia's does (with the store's own
// writes: store.MasterKeyRotations.BeginMasterKeyRotation). Until DropPrevious, the Log
// keeps the old K to check the records before it. If via fails, the Log
// goes back to the old K alone.
func (l *Log) AppendSwitch(ctx context.Context, ev Event, next masterkey.Master, via func(next store.AuditNext) error) (Record, error) {
	nk, err := next.Derive(masterkey.LabelAuditMAC)
	if err != nil {
		return Record{}, fmt.Errorf("audit key: %w", err)
	}
	old := l.keys.Load()
	if old.prev != nil {
		nk.Destroy()
		return Record{}, fmt.Errorf("audit append %s: a key switch is under way already", ev.Action)
	}
	sw := &keys{cur: nk, prev: old.cur}
	rec, err := l.appendWith(ctx, ev, func() *keys { l.keys.Store(sw); return sw }, via)
	if err != nil {
		// Records other appends made under the new key in between are
		// refused by Verify only if the old key is wiped: the caller
		// keeps it (the rotation did not start).
		l.keys.CompareAndSwap(sw, old)
		if l.keys.Load() == old {
			nk.Destroy()
		}
		return Record{}, err
	}
	return rec, nil
}

// Resume makes a Log built with the old master key (New) one in the
// middle of a rotation to next: new records under next's K, the old K kept
// to check the records before the switch. A restarted service calls it
// when the store says a rotation is under way.
func (l *Log) Resume(next masterkey.Master) error {
	nk, err := next.Derive(masterkey.LabelAuditMAC)
	if err != nil {
		return fmt.Errorf("audit key: %w", err)
	}
	old := l.keys.Load()
	l.keys.Store(&keys{cur: nk, prev: old.cur})
	return nil
}

// DropPrevious wipes the old K at the end of a rotation. From then on the
// records before the switch are checked by hash and link only
// (Report.Retired).
func (l *Log) DropPrevious() {
	old := l.keys.Load()
	if old.prev == nil {
		return
	}
	l.keys.Store(&keys{cur: old.cur})
	old.prev.Destroy()
}

// isSwitch reports whether r is a rotation's begin record.
func isSwitch(r store.AuditRecord) bool {
	if r.Action != string(ActionMasterKeyRotate) {
		return false
	}
	var d MasterKeyRotate
	return json.Unmarshal(r.Details, &d) == nil && d.Phase == RotateBegin
}
