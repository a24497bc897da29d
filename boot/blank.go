package boot

import (
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/keygate/keygate/disk"
	"github.com/keygate/keygate/disk/luks2"
	"github.com/keygate/keygate/disk/xts"
	"github.com/keygate/keygate/keymem"
)

// blankCheck is how much of the start (and of the end, where a GPT keeps
// its backup header) must be zeros for a device to count as blank: the
// whole LUKS2 header area.
const blankCheck = disk.DataOffset

// imageState is what inspect learned about an image without a key.
type imageState struct {
	luks      bool
	token     *luks2.KeygateToken
	zero      bool  // no LUKS2 header and only zeros where checked
	nonZeroAt int64 // first non-zero byte found, when !zero
}

func inspect(path string) (imageState, error) {
	f, err := os.Open(path)
	if err != nil {
		return imageState{}, fmt.Errorf("boot: open image: %w", err)
	}
	defer f.Close()
	vol, err := luks2.Open(f)
	if err == nil {
		st := imageState{luks: true}
		if _, tok, err := vol.FindKeygateToken(); err == nil {
			st.token = &tok
		}
		return st, nil
	}
	if !errors.Is(err, luks2.ErrNotLUKS2) {
		return imageState{}, fmt.Errorf("boot: %s: %w (a damaged LUKS2 header is never reformatted)", path, err)
	}
	size, err := f.Seek(0, io.SeekEnd)
	if err != nil {
		return imageState{}, fmt.Errorf("boot: %s: %w", path, err)
	}
	if size < disk.DataOffset+disk.MinFAT32Size {
		return imageState{}, fmt.Errorf("boot: %s is %d bytes; a keygate volume needs at least %d", path, size, disk.DataOffset+disk.MinFAT32Size)
	}
	st := imageState{zero: true}
	for _, r := range [][2]int64{{0, blankCheck}, {size - 1<<20, 1 << 20}} {
		if at, ok, err := zeros(f, r[0], r[1]); err != nil {
			return imageState{}, fmt.Errorf("boot: read %s: %w", path, err)
		} else if !ok {
			st.zero, st.nonZeroAt = false, at
			break
		}
	}
	return st, nil
}

// zeros reports whether n bytes at off are all zero, and if not where the
// first other byte is.
func zeros(f *os.File, off, n int64) (int64, bool, error) {
	buf := make([]byte, 1<<20)
	for done := int64(0); done < n; {
		m := min(int64(len(buf)), n-done)
		if _, err := f.ReadAt(buf[:m], off+done); err != nil {
			return 0, false, err
		}
		for i, c := range buf[:m] {
			if c != 0 {
				return off + done + int64(i), false, nil
			}
		}
		done += m
	}
	return 0, true, nil
}

// formatBlank formats the blank image at path in place (formatFile). It is
// called only on an image inspect found blank, and checks again with the
// file open for writing, so that a device written meanwhile is not
// formatted.
func formatBlank(path string, uk []byte, tok luks2.KeygateToken, t disk.FSType) error {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	if _, ok, err := zeros(f, 0, 4096); err != nil || !ok {
		return errors.Join(err, errors.New("the device is no longer blank; not formatting"))
	}
	if err := formatFile(f, uk, tok, t, 4096, tok.VolumeID); err != nil {
		return err
	}
	return f.Sync()
}

// digestIterations is the pbkdf2 count of the volume-key digest keygate
// writes for volumes whose keyslot is the UK: cryptsetup's minimum. The
// digest's input is the random 64-byte volume key, so iterations add no
// strength, while luks2.DigestIterations (100000) would cost about 30 ms
// of every unlock.
const digestIterations = 1000

// formatFile writes, over f, a LUKS2 header whose keyslot 0 opens with uk
// (pbkdf2, since uk is already high-entropy), the keygate token tok, and a
// filesystem of type t.
func formatFile(f *os.File, uk []byte, tok luks2.KeygateToken, t disk.FSType, sectorSize int, label string) error {
	vol, vk, err := luks2.Format(f, uk, luks2.FormatOptions{SectorSize: sectorSize, PBKDF: luks2.KeyPBKDF(), Label: label, DigestIterations: digestIterations})
	if err != nil {
		return err
	}
	defer keymem.Wrap(vk).Destroy()
	tok.Keyslot = 0
	gt, err := tok.Token()
	if err != nil {
		return err
	}
	if _, err := vol.AddToken(gt); err != nil {
		return fmt.Errorf("write keygate token: %w", err)
	}
	if t == "" {
		return nil
	}
	seg, err := vol.DataSegment()
	if err != nil {
		return err
	}
	size := seg.Size
	if size < 0 {
		end, err := f.Seek(0, io.SeekEnd)
		if err != nil {
			return err
		}
		size = end - seg.Offset
		size -= size % int64(seg.SectorSize)
	}
	c, err := xts.New(vk.Bytes())
	if err != nil {
		return err
	}
	defer c.Close()
	dev, err := disk.NewDevice(f, seg.Offset, size, seg.SectorSize, c)
	if err != nil {
		return err
	}
	fsys, err := disk.Mkfs(dev, t, label)
	if err == nil {
		err = fsys.Close()
	}
	if err = errors.Join(err, dev.Close()); err != nil {
		return fmt.Errorf("make %s: %w", t, err)
	}
	return nil
}
