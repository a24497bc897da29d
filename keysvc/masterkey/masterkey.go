// Package masterkey owns the key service's master key: loading it from (or
// creating) a 0600 key file, deriving it from an operator passphrase with
// argon2id, deriving labelled sub-keys with HKDF-SHA256, and sealing secrets at
// rest (AES-256-GCM under the records sub-key, bound to the record ID).
//
// The master key and every sub-key live in memguard locked buffers. Two
// standard-library primitives keep copies on the Go heap while they run:
// crypto/aes keeps its expanded key schedule there, and crypto/hmac (inside
// HKDF) keeps its padded keys there. That is acceptable on the on-prem key
// service host (the VM side keeps its own schedule in locked memory, see
// DESIGN.md). To keep that exposure short, a cipher is built per call and
// dropped when the call returns; nothing here caches a *cipher.Block.
//
// It can also keep the master key sealed to the host's TPM instead of in a
// plain file (tpmseal.go: LoadOrCreateSealed, SealExisting), through a small
// Sealer interface that package tpm implements.
//
// The package does not own where the key file lives (the caller passes a
// path), nor opening a TPM (the caller passes a Sealer).
package masterkey

import (
	"crypto/hkdf"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/awnumar/memguard"
	"golang.org/x/crypto/argon2"
)

// Size is the length in bytes of the master key and of every derived sub-key.
const Size = 32

// Sub-key labels. Changing a label changes the derived key, so a label carries
// a version; add a new label rather than editing one.
const (
	LabelChallengeMAC = "keygate challenge mac v1"
	LabelAuditMAC     = "keygate audit mac v1"
	LabelRecords      = "keygate records v1"
	// LabelRowMAC keys the MACs of the key service's stored rows that
	// decide a release (VMs, volumes) and of the store's genesis anchor.
	LabelRowMAC = "keygate row mac v1"
)

// argon2id parameters for FromPassphrase: RFC 9106's second recommended
// setting (t=3, m=64 MiB, p=4). Changing them changes every derived key.
const (
	argonTime    = 3
	argonMemory  = 64 * 1024 // KiB
	argonThreads = 4
	// MinSaltSize is the shortest salt FromPassphrase accepts.
	MinSaltSize = 16
)

// ErrKeyFile marks a master key file that exists but must not be used as it
// is (wrong permissions, wrong length, not a regular file). The error text
// names the fix.
var ErrKeyFile = errors.New("unusable master key file")

// Key is the service master key. It is safe for concurrent use. Destroy wipes
// it; a destroyed Key must not be used again.
type Key struct {
	master  *memguard.LockedBuffer
	records *memguard.LockedBuffer // HKDF(master, LabelRecords)
}

// newKey takes ownership of buf (Size bytes) and derives the records sub-key.
func newKey(buf *memguard.LockedBuffer) (*Key, error) {
	k := &Key{master: buf}
	rec, err := k.Derive(LabelRecords)
	if err != nil {
		buf.Destroy()
		return nil, err
	}
	k.records = rec
	return k, nil
}

// Destroy wipes the master key and its cached sub-keys.
func (k *Key) Destroy() {
	k.master.Destroy()
	if k.records != nil {
		k.records.Destroy()
	}
}

// LoadOrCreate reads the master key from the file at path, or creates that
// file with a fresh random key if it does not exist; created reports which
// happened. The parent directory is created (0700) if missing.
//
// Creation never leaves a half-written key: the key is written to a temporary
// file in the same directory, fsynced, and then hard-linked into place (link
// fails if the name exists, so two services starting at once cannot replace
// each other's key; the loser loads the winner's). The directory is fsynced
// after the link.
//
// An existing file is refused (ErrKeyFile) if any group or other permission
// bit is set, if it is not a regular file, or if it is not exactly Size bytes.
//
// If UseSealer installed a Sealer for path, this is LoadOrCreateSealed.
// Otherwise a sealed key beside path (path+SealedSuffix) is refused
// (ErrSealed), rather than a new plain key being made in its place.
func LoadOrCreate(path string) (key *Key, created bool, err error) {
	if s := sealerFor(path); s != nil {
		return LoadOrCreateSealed(path, s)
	}
	if err := checkNotSealed(path); err != nil {
		return nil, false, err
	}
	k, err := load(path)
	if err == nil {
		return k, false, nil
	}
	if !errors.Is(err, fs.ErrNotExist) {
		return nil, false, err
	}
	k, err = create(path)
	if errors.Is(err, fs.ErrExist) { // lost a creation race: use the winner's key
		k, err = load(path)
		return k, false, err
	}
	if err != nil {
		return nil, false, err
	}
	return k, true, nil
}

func load(path string) (*Key, error) {
	f, err := os.Open(path)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, err
		}
		return nil, fmt.Errorf("open master key: %w", err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("stat master key: %w", err)
	}
	if !st.Mode().IsRegular() {
		return nil, fmt.Errorf("%w: %s is not a regular file (restore the key file from backup)", ErrKeyFile, path)
	}
	if perm := st.Mode().Perm(); perm&0o077 != 0 {
		return nil, fmt.Errorf("%w: %s has mode %04o, readable or writable by group or others (run: chmod 600 %s, and consider the key exposed)",
			ErrKeyFile, path, perm, path)
	}
	if st.Size() != Size {
		return nil, fmt.Errorf("%w: %s is %d bytes, want %d (the file is damaged or not a keygate master key: restore it from backup)",
			ErrKeyFile, path, st.Size(), Size)
	}
	buf := memguard.NewBuffer(Size)
	if _, err := io.ReadFull(f, buf.Bytes()); err != nil {
		buf.Destroy()
		return nil, fmt.Errorf("read master key %s: %w (restore it from backup)", path, err)
	}
	// The file may have grown between Stat and read.
	var extra [1]byte
	if n, _ := f.Read(extra[:]); n != 0 {
		extra[0] = 0
		buf.Destroy()
		return nil, fmt.Errorf("%w: %s is longer than %d bytes (restore it from backup)", ErrKeyFile, path, Size)
	}
	return newKey(buf)
}

func create(path string) (*Key, error) {
	buf := memguard.NewBufferRandom(Size)
	if err := linkNew(path, buf.Bytes()); err != nil {
		buf.Destroy()
		return nil, err
	}
	return newKey(buf)
}

// FromPassphrase derives the master key from an operator passphrase with
// argon2id (t=3, m=64 MiB, p=4). salt must be at least MinSaltSize random
// bytes, stored beside the database; it is not secret. The passphrase is not
// modified; the caller should wipe it.
//
// argon2's working memory and its output are on the Go heap while it runs; the
// output is moved into locked memory and wiped before this returns.
func FromPassphrase(pass, salt []byte) (*Key, error) {
	if len(pass) == 0 {
		return nil, errors.New("derive master key: empty passphrase")
	}
	if len(salt) < MinSaltSize {
		return nil, fmt.Errorf("derive master key: salt is %d bytes, want at least %d random bytes", len(salt), MinSaltSize)
	}
	out := argon2.IDKey(pass, salt, argonTime, argonMemory, argonThreads, Size)
	return newKey(memguard.NewBufferFromBytes(out)) // wipes out
}

// Derive returns the Size-byte sub-key for label: HKDF-SHA256 with the master
// key as input keying material, no salt, and label as info. The same label
// always gives the same key; distinct labels give independent keys. The
// caller owns the returned buffer and should Destroy it.
func (k *Key) Derive(label string) (*memguard.LockedBuffer, error) {
	if label == "" {
		return nil, errors.New("derive sub-key: empty label")
	}
	out, err := hkdf.Key(sha256.New, k.master.Bytes(), nil, label, Size)
	if err != nil {
		return nil, fmt.Errorf("derive sub-key %q: %v", label, err)
	}
	return memguard.NewBufferFromBytes(out), nil // wipes out
}

// linkNew writes data to a new 0600 file at path, completely or not at all,
// and fails with fs.ErrExist if path exists.
func linkNew(path string, data []byte) error {
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("create master key directory: %w", err)
	}
	tmp, err := os.CreateTemp(dir, ".masterkey-*.tmp")
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	defer os.Remove(tmp.Name())
	_, err = tmp.Write(data)
	if err == nil {
		err = tmp.Chmod(0o600)
	}
	if err == nil {
		err = tmp.Sync()
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := os.Link(tmp.Name(), path); err != nil {
		if errors.Is(err, fs.ErrExist) {
			return err
		}
		return fmt.Errorf("install %s: %w", path, err)
	}
	return syncDir(dir)
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return nil // best effort: the rename is done
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("sync %s: %w", dir, err)
	}
	return nil
}
