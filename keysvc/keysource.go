package keysvc

import (
	"crypto/rand"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/keygate/keygate/keysvc/masterkey"
	"github.com/keygate/keygate/keysvc/masterkey/hsm"
)

// keySource is where the service's master key lives, and where a
// master-key rotation keeps the key it moves to until it is installed:
// a file in the data directory (fileSource) or a PKCS#11 token
// (hsmSource).
type keySource interface {
	// load returns the current master key, creating it if there is none.
	load() (mk masterkey.Master, created bool, err error)
	// next returns the rotation's new key, creating it if create is set;
	// errNoNext if there is none and create is not set.
	next(create bool) (masterkey.Master, error)
	// install makes the new key the current one and wipes the old one.
	// Repeating it after a crash finishes what is left; with no new key
	// it does nothing.
	install() error
	kind() string // "file" or "pkcs11"
	close()
}

var errNoNext = errors.New("no new master key")

// NextKeySuffix is appended to master.key for the key a rotation moves to.
const NextKeySuffix = ".next"

// oldKeySuffix names the old key file's last link while install wipes it.
const oldKeySuffix = ".old"

// fileSource is DIR/master.key (or, with a Sealer installed by the command
// line, DIR/master.key.tpm).
type fileSource struct{ path string }

func (f fileSource) kind() string { return "file" }
func (f fileSource) close()       {}

func (f fileSource) load() (masterkey.Master, bool, error) {
	if err := f.dropOld(); err != nil {
		return nil, false, err
	}
	mk, created, err := masterkey.LoadOrCreate(f.path)
	if err != nil {
		return nil, false, err // not a nil *Key in a non-nil interface
	}
	return mk, created, nil
}

func (f fileSource) sealed() bool {
	_, err := os.Stat(f.path + masterkey.SealedSuffix)
	return err == nil
}

func (f fileSource) next(create bool) (masterkey.Master, error) {
	p := f.path + NextKeySuffix
	probe := p
	if f.sealed() {
		// The new key is sealed to the same TPM as the current one, in
		// master.key.next.tpm; the command line installed that TPM's
		// Sealer for master.key only.
		s := masterkey.SealerOf(f.path)
		if s == nil {
			return nil, fmt.Errorf("%s is sealed to a TPM, but no TPM was given: start with --master-key-tpm naming it", f.path+masterkey.SealedSuffix)
		}
		defer masterkey.UseSealer(p, s)()
		probe = p + masterkey.SealedSuffix
	}
	if !create {
		if _, err := os.Stat(probe); errors.Is(err, fs.ErrNotExist) {
			return nil, errNoNext
		}
	}
	mk, _, err := masterkey.LoadOrCreate(p)
	if err != nil {
		return nil, err
	}
	return mk, nil
}

// files names the current key's file, the rotation's new key's, and the
// name the old key's last link takes while install wipes it: master.key,
// master.key.next and master.key.old, or for a key sealed to a TPM the
// same names with masterkey.SealedSuffix (the sealed blob is useless
// without the TPM, but a retired one is wiped all the same).
func (f fileSource) files() (cur, next, old string) {
	sfx := ""
	if f.sealed() {
		sfx = masterkey.SealedSuffix
	}
	return f.path + sfx, f.path + NextKeySuffix + sfx, f.path + oldKeySuffix + sfx
}

// install links the old key to master.key.old, renames master.key.next
// over master.key (atomic: the name always holds one whole key), syncs
// the directory, then overwrites the old key's file with random bytes and
// removes it. A crash leaves at worst master.key.old, which the next load
// wipes. Overwriting in place is best effort: a copy-on-write or
// wear-levelled disk may keep the old blocks.
func (f fileSource) install() error {
	cur, next, old := f.files()
	if _, err := os.Stat(next); errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err := os.Remove(old); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("install new master key: %w", err)
	}
	if err := os.Link(cur, old); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("install new master key: keep the old one aside: %w", err)
	}
	if err := os.Rename(next, cur); err != nil {
		return fmt.Errorf("install new master key: %w", err)
	}
	if d, err := os.Open(filepath.Dir(f.path)); err == nil {
		err = d.Sync()
		d.Close()
		if err != nil {
			return fmt.Errorf("install new master key: sync %s: %w", filepath.Dir(f.path), err)
		}
	}
	return wipeFile(old)
}

// dropOld deals with a master.key.old left by a crash inside install.
// Before the rename it is a second link to the current master.key, the same
// inode: wiping it would overwrite the key in use, so only the link goes.
// After the rename it is the retired key's last name, and is wiped.
func (f fileSource) dropOld() error {
	cur, _, old := f.files()
	oi, err := os.Stat(old)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("check %s: %w", old, err)
	}
	if ci, err := os.Stat(cur); err == nil && os.SameFile(oi, ci) {
		if err := os.Remove(old); err != nil {
			return fmt.Errorf("remove %s: %w", old, err)
		}
		return nil
	}
	return wipeFile(old)
}

// wipeFile overwrites path with random bytes, syncs it and removes it; a
// missing file is not an error.
func wipeFile(path string) error {
	fh, err := os.OpenFile(path, os.O_WRONLY, 0)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("wipe old master key %s: %w", path, err)
	}
	st, err := fh.Stat()
	if err == nil {
		junk := make([]byte, st.Size())
		rand.Read(junk)
		_, err = fh.WriteAt(junk, 0)
	}
	if err == nil {
		err = fh.Sync()
	}
	fh.Close()
	if err != nil {
		return fmt.Errorf("wipe old master key %s: %w", path, err)
	}
	return os.Remove(path)
}

// hsmSource is a key object in a PKCS#11 token.
type hsmSource struct{ tok *hsm.Token }

func (h hsmSource) kind() string { return "pkcs11" }
func (h hsmSource) close()       { h.tok.Close() }

// load finds or creates the key object. If only the rotation's new key is
// there, a rotation was cut short while installing it (the old object
// destroyed, the new one not yet relabelled): that step is finished first.
func (h hsmSource) load() (masterkey.Master, bool, error) {
	if _, err := h.tok.Find(h.tok.Label()); errors.Is(err, hsm.ErrNotFound) {
		if _, err := h.tok.FindNext(); err == nil {
			if err := h.tok.Install(); err != nil {
				return nil, false, err
			}
		}
	}
	k, created, err := h.tok.LoadOrCreate(h.tok.Label())
	if err != nil {
		return nil, false, err
	}
	return k, created, nil
}

func (h hsmSource) next(create bool) (masterkey.Master, error) {
	var (
		k   *hsm.Key
		err error
	)
	if create {
		k, err = h.tok.CreateNext()
	} else if k, err = h.tok.FindNext(); errors.Is(err, hsm.ErrNotFound) {
		err = errNoNext
	}
	if err != nil {
		return nil, err
	}
	return k, nil
}

func (h hsmSource) install() error { return h.tok.Install() }
