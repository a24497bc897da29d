package masterkey

import (
	"encoding/hex"
	"fmt"

	"github.com/awnumar/memguard"
)

// Master is a master key wherever it lives: a *Key (a file, a TPM-sealed
// file or a passphrase; the key bytes in locked memory) or a key object in
// an HSM (package keysvc/masterkey/hsm; the key bytes never leave the
// token). The key service depends on this interface only.
type Master interface {
	// Seal encrypts plaintext for storage under recordID (bound as
	// additional data); Open must be given the same ID.
	Seal(recordID string, plaintext []byte) ([]byte, error)
	// Open decrypts a sealed blob into a new locked buffer the caller
	// owns; any blob that does not authenticate is ErrOpen.
	Open(recordID string, sealed []byte) (*memguard.LockedBuffer, error)
	// Derive returns the Size-byte sub-key for label in a locked buffer
	// the caller owns.
	Derive(label string) (*memguard.LockedBuffer, error)
	// Destroy wipes what the process holds of the key (for an HSM key, it
	// closes the sessions; the key stays in the token).
	Destroy()
}

// Deriver derives sub-keys; every Master is one.
type Deriver interface {
	Derive(label string) (*memguard.LockedBuffer, error)
}

// LabelFingerprint is the label of the sub-key whose first bytes are the
// master key's fingerprint (Fingerprint).
const LabelFingerprint = "keygate master key fingerprint v1"

// Fingerprint names a master key without revealing it: the first 16 bytes,
// in hex, of its sub-key for LabelFingerprint. It is computed through
// Derive, so an HSM key gets one from inside the token and a file key from
// HKDF, and a store can record which key its rows are under whatever kind
// of key that is. Knowing it tells nothing of the key or of other sub-keys.
func Fingerprint(m Deriver) (string, error) {
	b, err := m.Derive(LabelFingerprint)
	if err != nil {
		return "", fmt.Errorf("master key fingerprint: %w", err)
	}
	defer b.Destroy()
	return hex.EncodeToString(b.Bytes()[:16]), nil
}

var _ Master = (*Key)(nil)
