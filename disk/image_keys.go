package disk

import (
	"crypto/rand"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/awnumar/memguard"

	"github.com/keygate/keygate/disk/luks2"
	"github.com/keygate/keygate/disk/xts"
	"github.com/keygate/keygate/keymem"
)

// minDataSize is the least data a new image may hold: below it no
// filesystem fits and the image is almost certainly a typo in --size.
const minDataSize = 1 << 20

// DataOffset is where keygate puts the data segment, as cryptsetup does.
const DataOffset = 16 << 20

// CreateOptions describe a new image.
type CreateOptions struct {
	Size       int64     // whole image file, header included
	SectorSize int       // 512 or 4096 (default 4096)
	FS         FSType    // "" for no filesystem
	Label      string    // LUKS2 label, and the filesystem's
	PBKDF      PBKDFKind // for the key's keyslot (default Argon2id)
	Recovery   bool      // add an argon2id recovery keyslot with a random passphrase
}

// Created is what CreateImage made. Recovery, when asked for, is the
// recovery passphrase in locked memory: show it once, then Wipe.
type Created struct {
	Info         Info
	KeySlot      int
	RecoverySlot int
	Recovery     *memguard.LockedBuffer
}

// Wipe destroys the recovery passphrase.
func (c *Created) Wipe() {
	if c.Recovery != nil {
		c.Recovery.Destroy()
	}
}

// CreateImage makes a new LUKS2 image at path, which must not exist. It
// builds the image in a temporary file beside path and links it into place
// only once the header, keyslots and filesystem are complete, so a failure
// leaves nothing behind and a concurrent file at path is never clobbered.
func CreateImage(path string, key *Key, opts CreateOptions) (*Created, error) {
	if opts.SectorSize == 0 {
		opts.SectorSize = 4096
	}
	if opts.SectorSize != 512 && opts.SectorSize != 4096 {
		return nil, fmt.Errorf("create %s: sector size %d: use 512 or 4096", path, opts.SectorSize)
	}
	if opts.Size < DataOffset+minDataSize {
		return nil, fmt.Errorf("create %s: --size %d bytes is too small: the LUKS2 header takes 16 MiB, so use at least 17M (32M or more for a filesystem)", path, opts.Size)
	}
	if opts.FS != "" && opts.FS != Ext4 && opts.FS != FAT32 {
		return nil, fmt.Errorf("create %s: unknown filesystem %q: use %s or %s", path, opts.FS, Ext4, FAT32)
	}
	if _, err := os.Lstat(path); err == nil {
		return nil, fmt.Errorf("create %s: the file exists; choose another name, or remove it first if its data is no longer needed", path)
	}
	opts.Size -= opts.Size % int64(opts.SectorSize)

	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".keygate-*")
	if err != nil {
		return nil, fmt.Errorf("create %s: %w", path, err)
	}
	done := false
	defer func() {
		if !done {
			tmp.Close()
			os.Remove(tmp.Name())
		}
	}()
	res, err := format(tmp, key, opts)
	if err != nil {
		return nil, fmt.Errorf("create %s: %w", path, err)
	}
	// A failed Sync or Close must stop the link: a half-written image
	// would otherwise take the name.
	err = tmp.Sync()
	if err == nil {
		err = tmp.Close()
	}
	if err == nil {
		err = linkNoClobber(tmp.Name(), path)
	}
	if err != nil {
		res.Wipe()
		return nil, fmt.Errorf("create %s: %w", path, err)
	}
	os.Remove(tmp.Name())
	done = true
	return res, nil
}

// linkNoClobber puts the finished image at path without ever replacing a
// file that appeared there meanwhile: a hard link fails if path exists.
// Filesystems without hard links (vfat, some network mounts) fall back to
// a rename after a last existence check, which narrows but cannot close
// that race.
func linkNoClobber(tmp, path string) error {
	err := os.Link(tmp, path)
	if err == nil || errors.Is(err, fs.ErrExist) {
		return err
	}
	if _, serr := os.Lstat(path); serr == nil {
		return fmt.Errorf("%s appeared while the image was being made: %w", path, fs.ErrExist)
	}
	return os.Rename(tmp, path)
}

func format(f *os.File, key *Key, opts CreateOptions) (*Created, error) {
	if err := f.Truncate(opts.Size); err != nil {
		return nil, err
	}
	vol, vk, err := luks2.Format(f, key.Bytes(), luks2.FormatOptions{SectorSize: opts.SectorSize, Label: opts.Label, PBKDF: opts.PBKDF.params()})
	if err != nil {
		return nil, err
	}
	defer keymem.Wrap(vk).Destroy()
	res := &Created{KeySlot: 0, RecoverySlot: -1}
	if opts.Recovery {
		res.Recovery, err = recoveryPassphrase()
		if err == nil {
			res.RecoverySlot, err = vol.AddKeyslot(vk, res.Recovery.Bytes(), luks2.PassphrasePBKDF())
		}
		if err != nil {
			res.Wipe()
			return nil, fmt.Errorf("add recovery keyslot: %w", err)
		}
	}
	if opts.FS != "" {
		if err := mkfsWith(f, vol, vk, opts.FS, opts.Label); err != nil {
			res.Wipe()
			return nil, err
		}
	}
	res.Info = Info{Info: vol.Info(), DataSize: opts.Size - DataOffset}
	return res, nil
}

func mkfsWith(f *os.File, vol *luks2.Volume, vk *memguard.LockedBuffer, t FSType, label string) error {
	seg, err := vol.DataSegment()
	if err != nil {
		return err
	}
	size, err := segmentSize(f, seg)
	if err != nil {
		return err
	}
	c, err := xts.New(vk.Bytes())
	if err != nil {
		return err
	}
	defer c.Close()
	dev, err := NewDevice(f, seg.Offset, size, seg.SectorSize, c)
	if err != nil {
		return err
	}
	fs, err := Mkfs(dev, t, label)
	if err == nil {
		err = fs.Close()
	}
	return errors.Join(err, dev.Close())
}

// recoveryAlphabet has no look-alike characters (no 0/o, 1/l/i), so a
// passphrase read off paper is typed back right.
const recoveryAlphabet = "abcdefghjkmnpqrstuvwxyz23456789"

// recoveryPassphrase returns 8 groups of 6 characters (about 238 bits),
// generated straight into locked memory.
func recoveryPassphrase() (*memguard.LockedBuffer, error) {
	const groups, per = 8, 6
	out := memguard.NewBuffer(groups*(per+1) - 1)
	b := out.Bytes()
	var r [1]byte
	for i, n := 0, 0; i < len(b); i++ {
		if i%(per+1) == per {
			b[i] = '-'
			continue
		}
		for {
			if _, err := rand.Read(r[:]); err != nil {
				out.Destroy()
				return nil, err
			}
			// rejection sampling keeps every character equally likely
			if int(r[0]) < 256-256%len(recoveryAlphabet) {
				break
			}
		}
		b[i] = recoveryAlphabet[int(r[0])%len(recoveryAlphabet)]
		n++
	}
	r[0] = 0
	return out, nil
}

// withVolume opens the image header read-write, unlocks it with key, and
// runs fn with the volume and its volume key.
func withVolume(path string, key *Key, fn func(*luks2.Volume, *memguard.LockedBuffer) error) error {
	f, vol, err := openHeader(path)
	if err != nil {
		return err
	}
	defer f.Close()
	vk, err := unlockVolume(vol, path, key)
	if err != nil {
		return err
	}
	defer vk.Destroy()
	if err := fn(vol, vk.Locked()); err != nil {
		return err
	}
	return f.Sync()
}

// AddKey adds a keyslot opened by newKey, authorised by key.
func AddKey(path string, key, newKey *Key, kind PBKDFKind) (int, error) {
	slot := -1
	err := withVolume(path, key, func(v *luks2.Volume, vk *memguard.LockedBuffer) error {
		var err error
		slot, err = v.AddKeyslot(vk, newKey.Bytes(), kind.params())
		if err != nil {
			return fmt.Errorf("add keyslot to %s: %w", path, err)
		}
		return nil
	})
	return slot, err
}

// RemoveKey wipes keyslot slot, authorised by key (any keyslot). Removing
// the last keyslot is refused unless force, as it destroys the data.
func RemoveKey(path string, key *Key, slot int, force bool) error {
	return withVolume(path, key, func(v *luks2.Volume, _ *memguard.LockedBuffer) error {
		err := v.RemoveKeyslot(slot, force)
		if errors.Is(err, luks2.ErrLastKeyslot) {
			return fmt.Errorf("remove keyslot %d from %s: %w: without it the data cannot be decrypted ever again; add another key first (keygate disk add-key), or pass --force to crypto-erase", slot, path, err)
		}
		if err != nil {
			return fmt.Errorf("remove keyslot %d from %s: %w", slot, path, err)
		}
		return nil
	})
}
