package disk

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/keygate/keygate/disk/luks2"
	"github.com/keygate/keygate/disk/xts"
	"github.com/keygate/keygate/keymem"
)

// maxKeyFile is cryptsetup's default --keyfile-size limit: a key file
// larger than this is almost certainly the wrong file.
const maxKeyFile = 8 << 20

// Key is keyslot passphrase material in locked memory: the bytes of a key
// file, exactly as cryptsetup --key-file reads them. Its pages are in the
// key-page registry (keymem) from creation until Destroy.
type Key struct {
	b *keymem.Buffer
}

// ReadKeyFile reads path, whole and as it is, straight into locked memory.
func ReadKeyFile(path string) (*Key, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("read key file: %w", err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("read key file: %w", err)
	}
	switch {
	case !st.Mode().IsRegular():
		return nil, fmt.Errorf("read key file %s: not a regular file", path)
	case st.Size() == 0:
		return nil, fmt.Errorf("read key file %s: the file is empty; a key file needs at least one byte (e.g. head -c 32 /dev/urandom > %s)", path, path)
	case st.Size() > maxKeyFile:
		return nil, fmt.Errorf("read key file %s: %d bytes is more than cryptsetup's 8 MiB limit; is it the right file?", path, st.Size())
	}
	b, err := keymem.New(int(st.Size()))
	if err != nil {
		return nil, fmt.Errorf("read key file %s: %w", path, err)
	}
	k := &Key{b}
	if _, err := io.ReadFull(f, k.Bytes()); err != nil {
		k.Destroy()
		return nil, fmt.Errorf("read key file %s: %w", path, err)
	}
	return k, nil
}

// NewKey copies p into locked memory; the caller wipes p.
func NewKey(p []byte) (*Key, error) {
	b, err := keymem.FromBytes(append([]byte(nil), p...))
	if err != nil {
		return nil, err
	}
	return &Key{b}, nil
}

// Bytes returns the key material; it is valid until Destroy.
func (k *Key) Bytes() []byte { return k.b.Bytes() }

// Destroy wipes and unlocks the key. It is idempotent.
func (k *Key) Destroy() { k.b.Destroy() }

// PBKDFKind picks the key derivation of a new keyslot.
type PBKDFKind string

// Argon2id suits passphrases people type; PBKDF2 suits high-entropy key
// files, where stretching adds nothing.
const (
	Argon2id PBKDFKind = "argon2id"
	PBKDF2   PBKDFKind = "pbkdf2"
)

func (k PBKDFKind) params() luks2.PBKDF {
	if k == PBKDF2 {
		return luks2.KeyPBKDF()
	}
	return luks2.PassphrasePBKDF()
}

// Info is a header summary for people and scripts; it holds no secret.
type Info struct {
	luks2.Info
	// DataSize is the plaintext size of the data segment in bytes.
	DataSize int64 `json:"data_size"`
}

// Inspect summarises the LUKS2 header of the image at path, without a key.
func Inspect(path string) (Info, error) {
	f, err := os.Open(path)
	if err != nil {
		return Info{}, fmt.Errorf("inspect: %w", err)
	}
	defer f.Close()
	v, err := luks2.Open(f)
	if err != nil {
		return Info{}, fmt.Errorf("inspect %s: %w", path, err)
	}
	in := Info{Info: v.Info()}
	if s, err := v.DataSegment(); err == nil {
		in.DataSize, _ = segmentSize(f, s)
	}
	return in, nil
}

// segmentSize resolves a "dynamic" segment to the whole sectors between its
// offset and the end of the image.
func segmentSize(f *os.File, s luks2.SegmentInfo) (int64, error) {
	if s.Size >= 0 {
		return s.Size, nil
	}
	total, err := fileSize(f)
	if err != nil {
		return 0, err
	}
	n := total - s.Offset
	n -= n % int64(s.SectorSize)
	if n <= 0 {
		return 0, fmt.Errorf("image is %d bytes, which leaves no data after the header (data starts at %d): %w", total, s.Offset, luks2.ErrTruncated)
	}
	return n, nil
}

// fileSize is the size of a regular file or of a block device, whose Stat
// size is 0 (a volume in a VM is /dev/vdb, not an image file).
func fileSize(f *os.File) (int64, error) {
	st, err := f.Stat()
	if err != nil {
		return 0, err
	}
	if st.Mode()&os.ModeDevice == 0 {
		return st.Size(), nil
	}
	n, err := f.Seek(0, io.SeekEnd)
	if err != nil {
		return 0, fmt.Errorf("size of block device %s: %w", f.Name(), err)
	}
	return n, nil
}

// Image is an unlocked LUKS2 image: its header, the cipher for its data
// segment (key schedule in locked memory) and the decrypted Device.
type Image struct {
	f      *os.File
	vol    *luks2.Volume
	dev    *Device
	fs     *FS
	blocks *Blocks
}

// OpenImage unlocks the image at path with key through any keyslot.
func OpenImage(path string, key *Key, writable bool) (*Image, error) {
	flag := os.O_RDONLY
	if writable {
		flag = os.O_RDWR
	}
	f, err := os.OpenFile(path, flag, 0)
	if err != nil {
		return nil, fmt.Errorf("open image: %w", err)
	}
	if err := lockImage(f, path, writable); err != nil {
		f.Close()
		return nil, err
	}
	im, err := unlock(f, path, key, writable)
	if err != nil {
		f.Close()
		return nil, err
	}
	return im, nil
}

func unlock(f *os.File, path string, key *Key, writable bool) (*Image, error) {
	vol, err := luks2.Open(f)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", path, err)
	}
	seg, err := vol.DataSegment()
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", path, err)
	}
	if seg.IVTweak != 0 {
		return nil, fmt.Errorf("open %s: data segment iv_tweak %d: %w (keygate reads volumes whose tweak starts at 0)", path, seg.IVTweak, luks2.ErrNotSupported)
	}
	size, err := segmentSize(f, seg)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", path, err)
	}
	vk, err := unlockVolume(vol, path, key)
	if err != nil {
		return nil, err
	}
	c, err := xts.New(vk.Bytes())
	vk.Destroy()
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", path, err)
	}
	opts := []Option{WithName(filepath.Base(path))}
	if !writable {
		opts = append(opts, ReadOnly())
	}
	dev, err := NewDevice(f, seg.Offset, size, seg.SectorSize, c, opts...)
	if err != nil {
		c.Close()
		return nil, fmt.Errorf("open %s: %w", path, err)
	}
	return &Image{f: f, vol: vol, dev: dev}, nil
}

// Device is the decrypted data segment.
func (im *Image) Device() *Device { return im.dev }

// FS opens the filesystem inside the image (once; later calls return it).
func (im *Image) FS() (*FS, error) {
	if im.fs != nil {
		return im.fs, nil
	}
	fs, err := OpenFS(im.dev)
	if err != nil {
		return nil, fmt.Errorf("open filesystem: %w", err)
	}
	im.fs = fs
	return fs, nil
}

// Mkfs makes a new filesystem over the whole data segment.
func (im *Image) Mkfs(t FSType, label string) error {
	fs, err := Mkfs(im.dev, t, label)
	if err != nil {
		return err
	}
	im.fs = fs
	return nil
}

// Close flushes the filesystem and the device, wipes the key schedule and
// closes the file. It reports the first error but always releases the key.
func (im *Image) Close() error {
	var errs []error
	if im.blocks != nil {
		errs = append(errs, im.blocks.close())
	}
	if im.fs != nil {
		errs = append(errs, im.fs.Close())
	}
	errs = append(errs, im.dev.Close())
	errs = append(errs, im.Wipe())
	if !im.dev.readOnly {
		errs = append(errs, im.f.Sync())
	}
	errs = append(errs, im.f.Close())
	return errors.Join(errs...)
}

// Wipe destroys the volume's key schedule as soon as the encryptions and
// decryptions under way end, without waiting for the disk: a read or write
// still waiting on it fails with ErrKeyWiped when it returns, and so does
// every later one, so what was not yet written is lost. It is for a lock
// that cannot wait (a revoke while the disk hangs); Close, which writes
// what is pending first, must still be called. Wipe is safe to call at any
// time, from any goroutine, more than once.
func (im *Image) Wipe() error {
	if g := im.dev.g; g != nil {
		return g.wipe()
	}
	return nil
}

// unlockVolume tries key on every keyslot and explains a failure in the
// terms a user can act on.
func unlockVolume(vol *luks2.Volume, path string, key *Key) (*keymem.Buffer, error) {
	vk, _, err := vol.Unlock(key.Bytes())
	switch {
	case err == nil:
		return keymem.Wrap(vk), nil
	case len(vol.Keyslots()) == 0:
		return nil, fmt.Errorf("open %s: the volume has no keyslots left: it was crypto-erased, and its data cannot be recovered", path)
	case errors.Is(err, luks2.ErrWrongKey):
		return nil, fmt.Errorf("open %s: %w (every byte of the file counts, a trailing newline too); 'keygate disk info %s' lists the keyslots", path, err, path)
	}
	return nil, fmt.Errorf("open %s: %w", path, err)
}
