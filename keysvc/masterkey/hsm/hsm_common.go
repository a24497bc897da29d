// Package hsm keeps the key service's master key in an HSM, through
// PKCS#11: a non-extractable, sensitive AES-256 key object in a token,
// created there on first use if absent. Sealing and opening unwrap keys
// (AES-256-GCM with the record ID as additional data) and deriving
// sub-keys (NIST SP 800-108 counter-mode KDF with AES-CMAC as its PRF) run
// inside the token; the key itself is never in this process's memory.
//
// It implements masterkey.Master, so the key service uses it as it uses a
// key file. It also owns the token side of master-key rotation: a second
// key object labelled NAME+NextSuffix, made the current one at the end
// (Token.Install).
//
// Library: github.com/miekg/pkcs11 rather than github.com/ThalesGroup/crypto11
// (which is built on it). crypto11 offers crypto.Signer/cipher.AEAD
// wrappers over keys, but not what this package needs beyond AES-GCM:
// AES-CMAC for sub-key derivation, reading and checking CKA_EXTRACTABLE /
// CKA_SENSITIVE on a found key, relabelling and destroying objects for
// rotation, and telling a wrong PIN from a missing token. With miekg each
// of those is one PKCS#11 call; with crypto11 they would need its
// underlying context anyway.
//
// What does pass through this process: the PIN (a Go string, as
// miekg/pkcs11's Login takes it, for the length of the login), unwrap
// keys being sealed or opened (the library returns plaintext in a Go
// slice, which is copied into locked memory and wiped at once), and the
// derived sub-keys, which the service keeps in locked memory as it does
// with a file key.
package hsm

import "errors"

// NextSuffix is appended to the key object's label for the key a rotation
// is moving to (Token.CreateNext); Install gives it the plain label.
const NextSuffix = ".next"

// Errors, each wrapped with a message that names the fix.
var (
	// ErrPIN: the token refused the PIN.
	ErrPIN = errors.New("the token refused the PIN")
	// ErrToken: no token matches the URI.
	ErrToken = errors.New("no PKCS#11 token matches")
	// ErrKeyObject: the object named is not a usable master key
	// (extractable, not sensitive, not AES-256, or ambiguous).
	ErrKeyObject = errors.New("unusable master key object")
	// ErrNotFound: no key object has the label.
	ErrNotFound = errors.New("no key object with that label")
)

// Config says which module, token and key to use.
type Config struct {
	Module string // path of the PKCS#11 library (--pkcs11-module)
	URI    URI    // token and object (--master-key-pkcs11)
	// PIN is the user PIN. Open does not keep it: the caller wipes it.
	PIN []byte
}
