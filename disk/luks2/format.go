package luks2

import (
	"crypto/rand"
	"fmt"
	"os"
	"strconv"

	"github.com/awnumar/memguard"
	"github.com/google/uuid"
	"github.com/keygate/keygate/keymem"
)

// FormatOptions select what Format writes. The zero value gives keygate's
// profile v1 (docs/format.md).
type FormatOptions struct {
	SectorSize int    // data sector size: 512 (default) or 4096
	Label      string // up to 47 bytes
	Subsystem  string // up to 47 bytes
	KeySize    int    // volume key bytes: 64 (default, AES-256-XTS) or 32
	PBKDF      PBKDF  // keyslot 0's KDF; zero means PassphrasePBKDF()
	UUID       string // zero means a random version-4 UUID

	// VolumeKey, when set, is used instead of a fresh random key (tests,
	// re-creating a header). Format copies it; the caller still owns it.
	VolumeKey *memguard.LockedBuffer
	// DigestIterations overrides DigestIterations (minimum 1000).
	DigestIterations int
}

// Format writes a new LUKS2 header to f: both header copies (seqid 1), a
// keyslots area wiped with random bytes, and keyslot 0 opened by
// passphrase. It does not size the file: the caller makes f at least
// DataOffset plus one data sector long, with a payload that is a whole
// number of sectors, and Format refuses anything else (ErrTruncated).
// The data area is not touched.
//
// It returns the opened volume and the volume key in a frozen locked
// buffer, which the caller destroys.
func Format(f *os.File, passphrase []byte, opts FormatOptions) (*Volume, *memguard.LockedBuffer, error) {
	if opts.SectorSize == 0 {
		opts.SectorSize = 512
	}
	if opts.KeySize == 0 {
		opts.KeySize = 64
	}
	if opts.PBKDF == (PBKDF{}) {
		opts.PBKDF = PassphrasePBKDF()
	}
	if opts.DigestIterations == 0 {
		opts.DigestIterations = DigestIterations
	}
	if opts.UUID == "" {
		opts.UUID = uuid.NewString()
	}
	switch {
	case opts.SectorSize != 512 && opts.SectorSize != 4096:
		return nil, nil, fmt.Errorf("sector size %d: use 512 or 4096", opts.SectorSize)
	case opts.KeySize != 64 && opts.KeySize != 32:
		return nil, nil, fmt.Errorf("key size %d bytes: aes-xts-plain64 takes 64 (AES-256) or 32 (AES-128)", opts.KeySize)
	case opts.VolumeKey != nil && opts.VolumeKey.Size() != opts.KeySize:
		return nil, nil, fmt.Errorf("volume key is %d bytes but key size is %d", opts.VolumeKey.Size(), opts.KeySize)
	case opts.DigestIterations < 1000:
		return nil, nil, fmt.Errorf("digest iterations %d: cryptsetup requires at least 1000", opts.DigestIterations)
	}
	if len(passphrase) == 0 {
		return nil, nil, errEmptyPassphrase
	}
	if err := opts.PBKDF.check(); err != nil {
		return nil, nil, err
	}
	if err := checkText("label", opts.Label); err != nil {
		return nil, nil, err
	}
	if err := checkText("subsystem", opts.Subsystem); err != nil {
		return nil, nil, err
	}
	if u, err := uuid.Parse(opts.UUID); err != nil || len(opts.UUID) != 36 || u.String() != opts.UUID {
		return nil, nil, fmt.Errorf("uuid %q: want the 36-character lowercase form", opts.UUID)
	}
	size, err := deviceSize(f)
	if err != nil {
		return nil, nil, err
	}
	if size < DataOffset+int64(opts.SectorSize) {
		return nil, nil, fmt.Errorf("image is %d bytes; a LUKS2 volume needs at least %d (16 MiB header plus one %d-byte sector): grow the file first (e.g. truncate -s 32M): %w",
			size, DataOffset+opts.SectorSize, opts.SectorSize, ErrTruncated)
	}
	if (size-DataOffset)%int64(opts.SectorSize) != 0 {
		return nil, nil, fmt.Errorf("image payload of %d bytes is not a whole number of %d-byte sectors: resize the file to a multiple of %d",
			size-DataOffset, opts.SectorSize, opts.SectorSize)
	}

	vk, err := keymem.NewLocked(opts.KeySize)
	if err != nil {
		return nil, nil, fmt.Errorf("volume key: %w", err)
	}
	if opts.VolumeKey != nil {
		vk.Copy(opts.VolumeKey.Bytes())
	} else {
		vk.Scramble()
		vk.Freeze() // as memguard.NewBufferRandom left it
	}
	ok := false
	defer func() {
		if !ok {
			vk.Destroy()
		}
	}()

	dg, err := newDigest(vk.Bytes(), opts.DigestIterations)
	if err != nil {
		return nil, nil, err
	}
	dg.Keyslots, dg.Segments = []string{"0"}, []string{"0"}
	m := &metadata{
		Keyslots: map[string]*jsonKeyslot{},
		Tokens:   map[string]*jsonToken{},
		Segments: map[string]*jsonSegment{"0": {
			Type: "crypt", Offset: DataOffset, Size: "dynamic", IVTweak: 0,
			Encryption: "aes-xts-plain64", SectorSize: opts.SectorSize,
		}},
		Digests: map[string]*jsonDigest{"0": dg},
		Config:  &jsonConfig{JSONSize: MetadataSize - binHeaderSize, KeyslotsSize: KeyslotsSize},
	}
	v := &Volume{f: f, size: size, meta: m, bin: binHeader{
		hdrSize: MetadataSize, label: opts.Label, subsystem: opts.Subsystem,
		csumAlg: "sha256", uuid: opts.UUID,
	}}
	if err := v.wipeHeaderAreas(); err != nil {
		return nil, nil, err
	}
	if err := v.writeKeyslot(m, 0, vk.Bytes(), passphrase, opts.PBKDF); err != nil {
		return nil, nil, err
	}
	if err := v.commit(m); err != nil {
		return nil, nil, err
	}
	vk.Freeze()
	ok = true
	return v, vk, nil
}

// wipeHeaderAreas zeroes both metadata areas and fills the keyslots area
// with random bytes, so no old key material survives and used areas do not
// stand out from unused ones.
func (v *Volume) wipeHeaderAreas() error {
	if _, err := v.f.WriteAt(make([]byte, 2*MetadataSize), 0); err != nil {
		return fmt.Errorf("wipe header area: %w", err)
	}
	if err := v.fillRandom(2*MetadataSize, KeyslotsSize); err != nil {
		return fmt.Errorf("wipe keyslots area: %w", err)
	}
	return v.f.Sync()
}

func (v *Volume) fillRandom(off, n int64) error {
	buf := make([]byte, min(n, 1<<20))
	for n > 0 {
		c := min(n, int64(len(buf)))
		if _, err := rand.Read(buf[:c]); err != nil {
			return err
		}
		if _, err := v.f.WriteAt(buf[:c], off); err != nil {
			return err
		}
		off += c
		n -= c
	}
	return nil
}

func itoa(n int) string { return strconv.Itoa(n) }
