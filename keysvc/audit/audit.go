// Package audit owns the key service's audit log: an append-only chain of
// records, each hashed over its contents and its predecessor's hash and MAC'd
// with a key derived from the master key, plus a MAC'd head that anchors the
// chain's end. Records are stored through store.AuditLog; this package does
// the cryptography, the store the transactions.
//
// # Construction
//
// Record n holds {seq, time, actor, action, subject, details (JSON),
// prev_hash, hash, mac}, where
//
//	prev_hash = hash of record n-1 (32 zero bytes for record 1)
//	hash      = SHA-256(canonical encoding of seq, time, actor, action,
//	            subject, details and prev_hash; see encodeRecord)
//	mac       = HMAC-SHA256(K, hash)
//	K         = HKDF-SHA256(master key, "keygate audit mac v1")
//
// In the same transaction as each record, the head row is set to
// {seq, hash, HMAC-SHA256(K, "keygate audit head v1" || seq || hash)}.
//
// # What Verify detects
//
//   - an edited record: its hash no longer matches its contents (KindEdited);
//   - a forged record, or an edited one whose hash was recomputed, by anyone
//     without K: its MAC fails (KindForged), and the next record's prev_hash
//     no longer matches (KindBrokenLink);
//   - a deleted record in the middle or at the start: a seq gap (KindMissing);
//   - reordered or spliced records: KindBrokenLink;
//   - deleted records at the end (truncation): the head names a later seq than
//     the last record (KindTruncated);
//   - a forged, deleted or mismatched head, or records appended after it
//     without K (KindHead);
//   - the wrong key: every MAC fails.
//
// What it cannot detect: an attacker who can write the database and who
// deletes tail records and also restores the head row to an older value that
// was genuinely MAC'd (saved from an earlier copy of the database) rolls the
// log back undetectably; so does restoring a whole older database. Only an
// anchor outside the attacker's reach closes that gap: export Head
// periodically (to the dashboard, a log host, a transparency log) and compare.
// Anyone holding K (that is, the master key) can rewrite the whole chain.
//
// # Secrets
//
// Secrets never enter the log. Event details are typed (see Details): only
// this package's detail types are accepted, and none of them has a field for
// key material or credentials.
package audit

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"sync/atomic"
	"time"

	"github.com/awnumar/memguard"

	"github.com/keygate/keygate/keysvc/masterkey"
	"github.com/keygate/keygate/keysvc/store"
)

// Action names what an audited event did.
type Action string

// Actions the key service records.
const (
	ActionEnroll    Action = "enroll"
	ActionUnlock    Action = "unlock"
	ActionDeny      Action = "deny"
	ActionRevoke    Action = "revoke"
	ActionErase     Action = "erase"
	ActionAdmin     Action = "admin"
	ActionLearn     Action = "learn"
	ActionProvision Action = "provision"
	ActionRotate    Action = "rotate"
	ActionAlert     Action = "alert"
	// ActionPolicy records a policy set by an administrator.
	ActionPolicy Action = "policy"
	// ActionVolume records a volume created or imported by an administrator.
	ActionVolume Action = "volume"
	// ActionGenesis records that the key service adopted the store: its
	// rows were authenticated under the master key and its anchor written.
	ActionGenesis Action = "genesis"
	// ActionTamper records that a stored row failed its integrity check.
	ActionTamper Action = "tamper"
	// ActionReattest records a re-attestation of a serving VM that failed
	// (the VM was told to lock) or a session whose re-attestations stopped.
	ActionReattest Action = "reattest"
)

// ErrChainBroken is returned by Append when the stored chain's end does not
// check out (its last record or head was altered, or the key is wrong).
// Append then refuses to extend the chain, so that it cannot paper over the
// damage; run Verify to find the cause.
var ErrChainBroken = errors.New("audit chain end does not verify (run `keysvc audit verify`; restore the database from backup if it was tampered with, or check that the right master key is in use)")

// ErrTampered is wrapped by the error Verify returns when the chain fails any
// check; the Report lists every problem found.
var ErrTampered = errors.New("audit chain failed verification")

// Event is what a caller records. Actor and Subject are free text: put names
// and IDs there, never a secret (see Details).
type Event struct {
	Actor   string // who: "admin:alice", "vm:web-1", "keysvc"
	Action  Action
	Subject string  // what it acted on: a VM name, a volume ID, an API path
	Details Details // nil records "{}"
}

// Record is a stored, chained event.
type Record struct {
	Seq      uint64
	Time     time.Time
	Actor    string
	Action   Action
	Subject  string
	Details  json.RawMessage
	PrevHash []byte
	Hash     []byte
	MAC      []byte
}

// Log appends to and verifies the audit chain. It is safe for concurrent use;
// appends are serialised by the store's write transaction.
type Log struct {
	st   store.AuditLog
	keys atomic.Pointer[keys] // K, and during a master-key rotation the previous K (keyswitch.go)
	now  func() time.Time
}

// Option configures a Log.
type Option func(*Log)

// WithClock sets the clock used to stamp records (default time.Now).
func WithClock(now func() time.Time) Option { return func(l *Log) { l.now = now } }

// New returns a Log over st whose MAC key is derived from mk with
// masterkey.LabelAuditMAC. Destroy the Log to wipe that key.
func New(st store.AuditLog, mk masterkey.Deriver, opts ...Option) (*Log, error) {
	k, err := mk.Derive(masterkey.LabelAuditMAC)
	if err != nil {
		return nil, fmt.Errorf("audit key: %w", err)
	}
	l := &Log{st: st, now: time.Now}
	l.keys.Store(&keys{cur: k})
	for _, o := range opts {
		o(l)
	}
	return l, nil
}

// Destroy wipes the Log's MAC key.
func (l *Log) Destroy() { l.keys.Load().destroy() }

// Append adds ev to the chain and returns the stored record. The store runs
// it in one write transaction that reads the chain's end, so concurrent
// appends (from goroutines, or from replicas on one database) never fork the
// chain. It checks the end it extends (last record's hash and MAC, the head's
// MAC, and that they agree) and fails with ErrChainBroken if it does not.
func (l *Log) Append(ctx context.Context, ev Event) (Record, error) {
	return l.append(ctx, nil, ev)
}

// AppendUsing is Append that also records the challenge use as used, in
// the same transaction (store.AuditLog.AppendAuditUsing): if the challenge
// was used already, nothing is appended and the error wraps
// store.ErrChallengeUsed.
func (l *Log) AppendUsing(ctx context.Context, use store.ChallengeUse, ev Event) (Record, error) {
	return l.append(ctx, &use, ev)
}

// AppendVia is Append through a caller's own store transaction: via is
// given the function that makes the next record and head, and must run it
// as store.AuditLog.AppendAudit would (store.SQLite.Adopt does, together
// with its own writes).
func (l *Log) AppendVia(ctx context.Context, ev Event, via func(next store.AuditNext) error) (Record, error) {
	return l.appendWith(ctx, ev, nil, via)
}

func (l *Log) append(ctx context.Context, use *store.ChallengeUse, ev Event) (Record, error) {
	return l.appendWith(ctx, ev, nil, func(next store.AuditNext) error {
		if use != nil {
			return l.st.AppendAuditUsing(ctx, *use, next)
		}
		return l.st.AppendAudit(ctx, next)
	})
}

// appendWith appends ev through via. If sw is set, the record is the one
// that switches the chain to a new key (keyswitch.go): sw runs once the end it
// extends has been checked, inside the store's transaction, and returns
// the keys the record is MAC'd under.
func (l *Log) appendWith(ctx context.Context, ev Event, sw func() *keys, via func(next store.AuditNext) error) (Record, error) {
	if ev.Actor == "" || ev.Action == "" {
		return Record{}, errors.New("audit append: event needs an actor and an action")
	}
	details := []byte("{}")
	if ev.Details != nil {
		var err error
		if details, err = json.Marshal(ev.Details); err != nil {
			return Record{}, fmt.Errorf("audit append: encode details: %w", err)
		}
	}
	var out store.AuditRecord
	next := func(last *store.AuditRecord, head *store.AuditHead) (store.AuditRecord, store.AuditHead, error) {
		ks := l.keys.Load()
		seq, prev, err := ks.tip(last, head)
		if err != nil {
			return store.AuditRecord{}, store.AuditHead{}, err
		}
		if sw != nil {
			ks = sw()
		}
		r := store.AuditRecord{
			Seq:      seq,
			Time:     time.Unix(0, l.now().UnixNano()).UTC(),
			Actor:    ev.Actor,
			Action:   string(ev.Action),
			Subject:  ev.Subject,
			Details:  details,
			PrevHash: prev,
		}
		r.Hash = hashRecord(r)
		r.MAC = mac(ks.cur, r.Hash)
		out = r
		return r, store.AuditHead{Seq: seq, Hash: r.Hash, MAC: headMAC(ks.cur, seq, r.Hash)}, nil
	}
	if err := via(next); err != nil {
		return Record{}, fmt.Errorf("audit append %s: %w", ev.Action, err)
	}
	return fromStore(out), nil
}

// tip checks the chain end that the next record extends and returns that
// record's seq and prev_hash.
// A record or head under the previous key passes too: that is the end a
// rotation's switch record extends.
func (ks *keys) tip(last *store.AuditRecord, head *store.AuditHead) (uint64, []byte, error) {
	switch {
	case last == nil && head == nil:
		return 1, make([]byte, sha256.Size), nil
	case last == nil:
		return 0, nil, fmt.Errorf("%w: the head names record %d but there are no records", ErrChainBroken, head.Seq)
	case head == nil:
		return 0, nil, fmt.Errorf("%w: record %d exists but the head is missing", ErrChainBroken, last.Seq)
	case !hmac.Equal(hashRecord(*last), last.Hash):
		return 0, nil, fmt.Errorf("%w: record %d was edited", ErrChainBroken, last.Seq)
	case !ks.macOK(last.Hash, last.MAC):
		return 0, nil, fmt.Errorf("%w: record %d has a bad MAC", ErrChainBroken, last.Seq)
	case !ks.headOK(head):
		return 0, nil, fmt.Errorf("%w: the head has a bad MAC", ErrChainBroken)
	case head.Seq != last.Seq || !hmac.Equal(head.Hash, last.Hash):
		return 0, nil, fmt.Errorf("%w: the head names record %d but the last record is %d", ErrChainBroken, head.Seq, last.Seq)
	}
	return last.Seq + 1, last.Hash, nil
}

const (
	recordDomain = "keygate audit record v1\x00"
	headDomain   = "keygate audit head v1\x00"
)

// encodeRecord is the canonical encoding hashed into a record's hash: the
// domain string, seq (8 bytes big-endian), time as Unix nanoseconds (8 bytes
// big-endian, two's complement), then actor, action, subject, details and
// prev_hash, each as a 4-byte big-endian length followed by its bytes.
// Details are hashed exactly as stored, so no JSON canonicalisation is needed.
func encodeRecord(r store.AuditRecord) []byte {
	b := make([]byte, 0, len(recordDomain)+16+5*4+len(r.Actor)+len(r.Action)+len(r.Subject)+len(r.Details)+len(r.PrevHash))
	b = append(b, recordDomain...)
	b = binary.BigEndian.AppendUint64(b, r.Seq)
	b = binary.BigEndian.AppendUint64(b, uint64(r.Time.UnixNano()))
	for _, f := range [][]byte{[]byte(r.Actor), []byte(r.Action), []byte(r.Subject), r.Details, r.PrevHash} {
		b = binary.BigEndian.AppendUint32(b, uint32(len(f)))
		b = append(b, f...)
	}
	return b
}

func hashRecord(r store.AuditRecord) []byte {
	h := sha256.Sum256(encodeRecord(r))
	return h[:]
}

// mac and headMAC build an HMAC per call: crypto/hmac copies the key into
// padded blocks on the Go heap, accepted on the key service host for the
// length of one call.
func mac(key *memguard.LockedBuffer, hash []byte) []byte {
	m := hmac.New(sha256.New, key.Bytes())
	m.Write(hash)
	return m.Sum(nil)
}

func headMAC(key *memguard.LockedBuffer, seq uint64, hash []byte) []byte {
	m := hmac.New(sha256.New, key.Bytes())
	m.Write([]byte(headDomain))
	m.Write(binary.BigEndian.AppendUint64(nil, seq))
	m.Write(hash)
	return m.Sum(nil)
}

func fromStore(r store.AuditRecord) Record {
	return Record{
		Seq: r.Seq, Time: r.Time, Actor: r.Actor, Action: Action(r.Action), Subject: r.Subject,
		Details: json.RawMessage(r.Details), PrevHash: r.PrevHash, Hash: r.Hash, MAC: r.MAC,
	}
}
