package masterkey

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"errors"
	"fmt"

	"github.com/awnumar/memguard"
)

// sealVersion is the first byte of every sealed blob. Layout of version 1:
//
//	0x01 || nonce (12 bytes, random) || AES-256-GCM ciphertext || tag (16 bytes)
//
// The additional data is the version byte followed by the record ID, so a
// blob moved to another record, or relabelled with another version, fails to
// open. Random 96-bit nonces are safe for far more seals (2^32) than a key
// service makes under one master key.
const sealVersion = 1

const (
	nonceSize = 12
	tagSize   = 16
	// SealOverhead is how many bytes Seal adds to the plaintext.
	SealOverhead = 1 + nonceSize + tagSize
)

// ErrOpen is returned by Open for any blob that does not authenticate: wrong
// record ID, wrong master key, tampering, truncation or an unknown version.
// The error says nothing about the content.
var ErrOpen = errors.New("sealed record does not open (wrong record ID, wrong master key, or the record was altered)")

// gcm builds an AES-256-GCM AEAD under the records sub-key. It is built per
// call and dropped: crypto/aes keeps its key schedule on the Go heap, which is
// accepted on the key service host, but not for longer than a call.
func (k *Key) gcm() (cipher.AEAD, error) {
	block, err := aes.NewCipher(k.records.Bytes())
	if err != nil {
		return nil, fmt.Errorf("records cipher: %v", err)
	}
	return cipher.NewGCM(block)
}

func additionalData(recordID string) []byte {
	ad := make([]byte, 0, 1+len(recordID))
	ad = append(ad, sealVersion)
	return append(ad, recordID...)
}

// Seal encrypts plaintext for storage under the record ID recordID (for
// example a volume ID). Open must be given the same ID.
func (k *Key) Seal(recordID string, plaintext []byte) ([]byte, error) {
	if recordID == "" {
		return nil, errors.New("seal: empty record ID")
	}
	if len(plaintext) == 0 {
		return nil, errors.New("seal: empty plaintext")
	}
	aead, err := k.gcm()
	if err != nil {
		return nil, fmt.Errorf("seal record %q: %w", recordID, err)
	}
	out := make([]byte, 1+nonceSize, SealOverhead+len(plaintext))
	out[0] = sealVersion
	if _, err := rand.Read(out[1 : 1+nonceSize]); err != nil {
		return nil, fmt.Errorf("seal record %q: nonce: %w", recordID, err)
	}
	return aead.Seal(out, out[1:1+nonceSize], plaintext, additionalData(recordID)), nil
}

// Open decrypts a blob made by Seal for the same record ID into a new locked
// buffer, which the caller owns and should Destroy. Any failure to
// authenticate is ErrOpen.
func (k *Key) Open(recordID string, sealed []byte) (*memguard.LockedBuffer, error) {
	if len(sealed) <= SealOverhead || sealed[0] != sealVersion {
		return nil, fmt.Errorf("open record %q: %w", recordID, ErrOpen)
	}
	aead, err := k.gcm()
	if err != nil {
		return nil, fmt.Errorf("open record %q: %w", recordID, err)
	}
	nonce, ct := sealed[1:1+nonceSize], sealed[1+nonceSize:]
	buf := memguard.NewBuffer(len(ct) - tagSize)
	// Decrypt straight into locked memory: dst has exactly the capacity needed,
	// so GCM writes in place instead of allocating.
	if _, err := aead.Open(buf.Bytes()[:0], nonce, ct, additionalData(recordID)); err != nil {
		buf.Destroy()
		return nil, fmt.Errorf("open record %q: %w", recordID, ErrOpen)
	}
	return buf, nil
}
