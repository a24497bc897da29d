package keysvc

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"time"

	"github.com/keygate/keygate/keysvc/masterkey"
	"github.com/keygate/keygate/keysvc/store"
)

// The session MAC key (issue 15). Session tokens are checked under one key
// that every replica shares and that outlives master-key rotations and
// restarts: it is sealed under the master key in the store (service_keys,
// "session-mac") and re-sealed by a master-key rotation like the unwrap
// keys, never replaced by it.
//
// Why not a new session key per master key, the old one kept until the
// sessions issued under it end: sessions do not end. A VM holds its token
// from its unlock until it stops (boot/heartbeat.go), weeks on end, and has
// no way to get another short of a new unlock, which takes a reboot (the
// window PCR). Retiring a session key therefore means cutting off every VM
// that unlocked before, which is what this replaces (they got 401 on
// heartbeats and re-attestations while their volumes stayed open, so a
// revoke or a lock no longer reached them). And what the key guards is
// small: a session token releases no key and unlocks nothing. It lets its
// holder report events for the session, read whether it is revoked, and
// re-attest, which takes a quote by the VM's enrolled AK. What a master-key
// rotation protects, the UKs and the row MACs, moves to the new key; what an
// old master key still gives is the session key (sealed under it in old
// backups), that is, the power to forge event reports. docs/threat-model.md
// says so.
//
// The stored key's value is, on first use, the key keysvc derived from the
// master key before it was stored, so that sessions issued by an older
// keysvc stay valid across the upgrade.

const sessionKeyName = "session-mac"

// serviceKeyRecordID is the AEAD additional data a service key is sealed
// with: a sealed key does not open as anything else.
func serviceKeyRecordID(name string) string { return "keysvc service key v1:" + name }

// loadSessionKey returns the session MAC key sealed in st, storing one first
// if st has none: mk's derived session key, sealed under sealKey (the key
// writes use: the new one during a master-key rotation). The stored key is
// opened under mk or sealKey.
func loadSessionKey(ctx context.Context, st store.ServiceKeys, mk, sealKey MasterKey) ([]byte, error) {
	d, err := mk.Derive(labelSessionMAC)
	if err != nil {
		return nil, err
	}
	id := serviceKeyRecordID(sessionKeyName)
	sealed, err := sealKey.Seal(id, d.Bytes())
	d.Destroy()
	if err != nil {
		return nil, fmt.Errorf("seal: %w", err)
	}
	stored, err := st.ClaimServiceKey(ctx, sessionKeyName, sealed)
	if err != nil {
		return nil, err
	}
	for _, k := range []MasterKey{sealKey, mk} {
		b, err := k.Open(id, stored)
		if err == nil {
			out := bytes.Clone(b.Bytes())
			b.Destroy()
			return out, nil
		}
		if !errors.Is(err, masterkey.ErrOpen) {
			return nil, err
		}
	}
	return nil, fmt.Errorf("the stored session key opens under neither master key (%w): it was changed outside the key service, or the database belongs to another master key; restore the database from a backup", ErrTampered)
}

// withSessionKeyAlso has New also try next, the new master key of a
// rotation under way, on the stored session key (Start sets it).
func withSessionKeyAlso(next MasterKey) Option { return func(s *Server) { s.sessAlso = next } }

// initSessionKey sets the Server's session MAC key: the stored one if the
// store keeps service keys, else (a store without them) the master key's
// derived one, which a rotation then replaces.
func (s *Server) initSessionKey() error {
	ks, ok := s.st.(store.ServiceKeys)
	if !ok {
		sk, err := s.initMK.Derive(labelSessionMAC)
		if err != nil {
			return err
		}
		s.sess.Store(&sessionKeys{cur: bytes.Clone(sk.Bytes())})
		sk.Destroy()
		return nil
	}
	sealKey := s.initMK
	if s.sessAlso != nil {
		sealKey = s.sessAlso
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	key, err := loadSessionKey(ctx, ks, s.initMK, sealKey)
	if err != nil {
		return err
	}
	s.svcKeys, s.sessStored = ks, true
	s.sess.Store(&sessionKeys{cur: key})
	return nil
}

// rekeyServiceKeys re-seals the stored service keys under the rotation's
// new master key (masterkey_rotate.go, before the new key is installed).
func (s *Server) rekeyServiceKeys(ctx context.Context, ks *ringKeys) error {
	if s.svcKeys == nil {
		return nil
	}
	_, err := s.svcKeys.RekeyServiceKeys(ctx, func(name string, sealed []byte) ([]byte, error) {
		id := serviceKeyRecordID(name)
		b, done, err := s.openUK(id, sealed)
		if err != nil {
			return nil, fmt.Errorf("rekey service key %q: %w", name, err)
		}
		defer done()
		return ks.cur.Seal(id, b)
	})
	return err
}

// sessionRowDomain separates the re-attestation session rows' MACs.
const sessionRowDomain = "keygate reattest session row v1\x00"

// sessionRowMAC is the MAC of a store.ReattestSession: over its ID, VM,
// volume and lock time, under a key derived from the session key (which
// master-key rotations leave alone, so these rows need no re-MAC).
func (s *Server) sessionRowMAC(rs store.ReattestSession) []byte {
	sub := hmac.New(sha256.New, s.sess.Load().cur)
	sub.Write([]byte(sessionRowDomain))
	m := hmac.New(sha256.New, sub.Sum(nil))
	m.Write([]byte(sessionRowDomain))
	var n [8]byte
	for _, f := range []string{rs.ID, rs.VM, rs.Volume} {
		binary.BigEndian.PutUint64(n[:], uint64(len(f)))
		m.Write(n[:])
		m.Write([]byte(f))
	}
	var locked int64
	if rs.IsLocked() {
		locked = rs.Locked.UnixNano()
	}
	binary.BigEndian.PutUint64(n[:], uint64(locked))
	m.Write(n[:])
	return m.Sum(nil)
}

// sessionRowOK checks a session row's MAC in constant time.
func (s *Server) sessionRowOK(rs store.ReattestSession) bool {
	return hmac.Equal(rs.MAC, s.sessionRowMAC(rs))
}
