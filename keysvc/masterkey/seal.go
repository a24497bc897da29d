package masterkey

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"errors"
	"fmt"
	"io"

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
	buf := memguard.NewBuffer(len(sealed) - SealOverhead)
	if _, err := k.OpenTo(buf.Bytes(), recordID, sealed); err != nil {
		buf.Destroy()
		return nil, err
	}
	return buf, nil
}

// OpenTo decrypts a blob made by Seal for the same record ID into dst, which
// must be locked memory the caller owns (a memguard buffer), and returns the
// plaintext's length: the plaintext is dst[:n]. AES-GCM writes it straight
// into dst; no copy of it is made on the Go heap. On any error dst is wiped.
// A blob that does not authenticate is ErrOpen; a dst shorter than the
// plaintext is io.ErrShortBuffer (dst is wiped and nothing is decrypted).
//
// OpenTo lets a caller reuse locked buffers instead of allocating one per
// call as Open does.
func (k *Key) OpenTo(dst []byte, recordID string, sealed []byte) (n int, err error) {
	defer func() {
		if err != nil {
			clear(dst)
		}
	}()
	if len(sealed) <= SealOverhead || sealed[0] != sealVersion {
		return 0, fmt.Errorf("open record %q: %w", recordID, ErrOpen)
	}
	n = len(sealed) - SealOverhead
	if len(dst) < n {
		return 0, fmt.Errorf("open record %q: %d-byte buffer for a %d-byte secret: %w", recordID, len(dst), n, io.ErrShortBuffer)
	}
	aead, err := k.gcm()
	if err != nil {
		return 0, fmt.Errorf("open record %q: %w", recordID, err)
	}
	nonce, ct := sealed[1:1+nonceSize], sealed[1+nonceSize:]
	pt, err := aead.Open(dst[:0:n], nonce, ct, additionalData(recordID))
	if err != nil {
		return 0, fmt.Errorf("open record %q: %w", recordID, ErrOpen)
	}
	// GCM appends to dst[:0], which has exactly the capacity needed, so the
	// plaintext must be in dst. Check rather than trust it: were it
	// anywhere else, it would be on the heap.
	if len(pt) != n || &pt[0] != &dst[0] {
		clear(pt)
		return 0, fmt.Errorf("open record %q: plaintext not decrypted in place", recordID)
	}
	return n, nil
}
