package masterkey

import (
	"crypto/subtle"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sync"

	"github.com/awnumar/memguard"
)

// SealedSuffix is appended to the key file's path for the sealed form:
// DIR/master.key.tpm holds the master key sealed to the host's TPM, in place
// of the plain DIR/master.key.
const SealedSuffix = ".tpm"

// Sealer seals the master key to something outside the data directory, so
// that a copy of the directory alone does not yield the key. *tpm.TPM
// implements it (package tpm: Seal, Unseal, Spec); this package does not
// import tpm, so that it stays free of cgo and TPM libraries.
type Sealer interface {
	Seal(secret []byte) ([]byte, error)
	Unseal(blob []byte) (*memguard.LockedBuffer, error)
	// Spec names the sealer in messages, e.g. "swtpm:/run/swtpm.sock".
	Spec() string
}

// ErrSealed marks a master key that cannot be loaded the way it was asked
// for: it is sealed and no Sealer was given, or it does not unseal with the
// one given, or the plain and sealed forms are both present. The error text
// names the fix.
var ErrSealed = errors.New("master key is sealed to a TPM")

// sealers routes LoadOrCreate(path) through a Sealer; see UseSealer.
var sealers sync.Map // filepath.Clean(path) -> Sealer

// UseSealer makes LoadOrCreate(path) act as LoadOrCreateSealed(path, s)
// until release is called. It exists because the key service's Start calls
// LoadOrCreate with the key file's path and knows nothing of TPMs; the
// command line that opened the TPM installs it around Start.
func UseSealer(path string, s Sealer) (release func()) {
	p := filepath.Clean(path)
	sealers.Store(p, s)
	return func() { sealers.CompareAndDelete(p, s) }
}

// SealerOf returns the Sealer UseSealer installed for path, or nil.
func SealerOf(path string) Sealer { return sealerFor(path) }

func sealerFor(path string) Sealer {
	if s, ok := sealers.Load(filepath.Clean(path)); ok {
		return s.(Sealer)
	}
	return nil
}

// checkNotSealed refuses to use or create a plain key at path when a sealed
// one sits beside it: making a new plain key there would silently replace
// the key the database was written under.
func checkNotSealed(path string) error {
	if _, err := os.Lstat(path + SealedSuffix); err == nil {
		return fmt.Errorf("%w: %s exists; start with --master-key-tpm naming the TPM it was sealed to (or, if master.key is the key the database was made with, move %s aside)",
			ErrSealed, path+SealedSuffix, path+SealedSuffix)
	}
	return nil
}

// LoadOrCreateSealed is LoadOrCreate for a master key sealed with s, kept in
// path+SealedSuffix (0600) instead of path. On first use it makes a random
// key, seals it, checks that the blob unseals to the same key, and only then
// installs the blob (temporary file, fsync, hard link, directory fsync: never
// half-written, and a concurrent creator's blob is never replaced). Later
// calls unseal the blob.
//
// It refuses (ErrKeyFile) a plain key file at path: that key would be
// ignored, so the operator must say which one the database was made with
// (SealExisting moves a plain key into the sealer). It refuses (ErrSealed) a
// blob s cannot unseal: the error names s and what to do.
func LoadOrCreateSealed(path string, s Sealer) (key *Key, created bool, err error) {
	if _, err := os.Lstat(path); err == nil {
		if _, err := os.Lstat(path + SealedSuffix); err == nil {
			return nil, false, fmt.Errorf("%w: both %s and %s exist; if `keysvc master-key seal` was interrupted, escrow %s and remove it",
				ErrKeyFile, path, path+SealedSuffix, path)
		}
		return nil, false, fmt.Errorf("%w: %s is a plain master key, but a TPM-sealed one was asked for; to move it into the TPM run `keysvc master-key seal --data %s --master-key-tpm %s`, or start without --master-key-tpm",
			ErrKeyFile, path, filepath.Dir(path), s.Spec())
	}
	sealed := path + SealedSuffix
	k, err := loadSealed(sealed, s)
	if err == nil || !errors.Is(err, fs.ErrNotExist) {
		return k, false, err
	}
	buf := memguard.NewBufferRandom(Size)
	if err := installSealed(sealed, buf, s); err != nil {
		buf.Destroy()
		if errors.Is(err, fs.ErrExist) { // lost a creation race: use the winner's key
			k, err := loadSealed(sealed, s)
			return k, false, err
		}
		return nil, false, err
	}
	k, err = newKey(buf)
	return k, err == nil, err
}

// loadSealed reads and unseals the blob at path.
func loadSealed(path string, s Sealer) (*Key, error) {
	fi, err := os.Lstat(path)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, err
		}
		return nil, fmt.Errorf("stat sealed master key: %w", err)
	}
	if !fi.Mode().IsRegular() {
		return nil, fmt.Errorf("%w: %s is not a regular file (restore it from backup)", ErrKeyFile, path)
	}
	// The blob is useless without the TPM, but one others can write could be
	// swapped for a blob of the attacker's making; keep it as private as the
	// plain key.
	if perm := fi.Mode().Perm(); perm&0o077 != 0 {
		return nil, fmt.Errorf("%w: %s has mode %04o (run: chmod 600 %s)", ErrKeyFile, path, perm, path)
	}
	blob, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read sealed master key: %w", err)
	}
	buf, err := s.Unseal(blob)
	if err != nil {
		return nil, fmt.Errorf("%w: %s does not unseal on TPM %s: %w; start with --master-key-tpm naming the TPM it was sealed to, or restore the plain master.key from your escrow backup and start without --master-key-tpm",
			ErrSealed, path, s.Spec(), err)
	}
	if buf.Size() != Size {
		buf.Destroy()
		return nil, fmt.Errorf("%w: %s unseals to %d bytes, want %d (not a keygate master key: restore it from backup)", ErrKeyFile, path, buf.Size(), Size)
	}
	return newKey(buf)
}

// installSealed seals key with s, checks the blob unseals to key, and links
// it into place at path; fs.ErrExist if path appeared meanwhile.
func installSealed(path string, key *memguard.LockedBuffer, s Sealer) error {
	blob, err := s.Seal(key.Bytes())
	if err != nil {
		return fmt.Errorf("seal master key to TPM %s: %w", s.Spec(), err)
	}
	// A blob that does not come back is worse than none: everything written
	// under the key would be lost at the next start.
	back, err := s.Unseal(blob)
	if err != nil {
		return fmt.Errorf("check sealed master key on TPM %s: %w", s.Spec(), err)
	}
	same := subtle.ConstantTimeCompare(back.Bytes(), key.Bytes()) == 1
	back.Destroy()
	if !same {
		return fmt.Errorf("check sealed master key on TPM %s: it unseals to a different key", s.Spec())
	}
	return linkNew(path, blob)
}

// SealExisting moves the plain master key at path into s: it seals it to
// path+SealedSuffix (checked to unseal to the same key) and then removes the
// plain file. Back the plain file up (escrow) before calling it: once sealed,
// the key exists only inside that TPM, and a cleared or dead TPM loses every
// secret the service holds.
//
// If it stops between the two steps both files exist with the same key; a
// start then refuses until the plain one is moved aside.
func SealExisting(path string, s Sealer) error {
	k, err := load(path)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("seal master key: %s does not exist (start the service once without --master-key-tpm to create it, or with it to create a sealed key directly)", path)
		}
		return fmt.Errorf("seal master key: %w", err)
	}
	defer k.Destroy()
	if err := installSealed(path+SealedSuffix, k.master, s); err != nil {
		if errors.Is(err, fs.ErrExist) {
			return fmt.Errorf("seal master key: %w: %s already exists; move it aside if it is stale", ErrSealed, path+SealedSuffix)
		}
		return fmt.Errorf("seal master key: %w", err)
	}
	if err := os.Remove(path); err != nil {
		return fmt.Errorf("seal master key: sealed, but remove the plain %s: %w (remove it by hand)", path, err)
	}
	return syncDir(filepath.Dir(path))
}
