package disk

import (
	"errors"
	"path/filepath"
	"strings"
	"testing"
)

// TestJournalNeedsReplay: an ext4 a kernel left with its journal to replay
// (mounted over NBD when it stopped) is refused by a writable OpenFS,
// which would otherwise write under a journal whose replay undoes it; a
// read-only open still reads it.
func TestJournalNeedsReplay(t *testing.T) {
	img := filepath.Join(t.TempDir(), "v.img")
	key, err := NewKey([]byte("0123456789abcdef0123456789abcdef"))
	if err != nil {
		t.Fatal(err)
	}
	defer key.Destroy()
	if _, err := CreateImage(img, key, CreateOptions{Size: 64 << 20, FS: Ext4, PBKDF: PBKDF2}); err != nil {
		t.Fatal(err)
	}
	im, err := OpenImage(img, key, true)
	if err != nil {
		t.Fatal(err)
	}
	m, err := readExt4Meta(im.Device())
	if err != nil {
		t.Fatal(err)
	}
	m.sb[0x60] |= incompatRecover
	if err := m.writeSuper(); err != nil {
		t.Fatal(err)
	}
	if err := im.Close(); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name     string
		writable bool
		want     error
	}{
		{"writable", true, ErrJournalNeedsReplay},
		{"read-only", false, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			im, err := OpenImage(img, key, tc.writable)
			if err != nil {
				t.Fatal(err)
			}
			defer im.Close()
			_, err = im.FS()
			if !errors.Is(err, tc.want) {
				t.Fatalf("FS: %v, want %v", err, tc.want)
			}
		})
	}
}

// TestTornSuperblock: a superblock whose checksum fails is repaired at a
// writable open only when it looks torn (every field a tear cannot change
// agrees with group 1's backup); other damage is refused with the fix.
func TestTornSuperblock(t *testing.T) {
	for _, tc := range []struct {
		name    string
		damage  func(sb []byte)
		wantErr string
	}{
		{"free counts from another write (a tear)", func(sb []byte) { sb[0x0c] ^= 0x55 }, ""},
		{"the UUID changed (not a tear)", func(sb []byte) { sb[0x68] ^= 0xff }, "not a torn write"},
		{"the block size changed (not a tear)", func(sb []byte) { sb[0x20] ^= 0x01 }, "not a torn write"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			img := filepath.Join(t.TempDir(), "v.img")
			key, err := NewKey([]byte("0123456789abcdef0123456789abcdef"))
			if err != nil {
				t.Fatal(err)
			}
			defer key.Destroy()
			// Three block groups, so that group 1 holds a backup.
			if _, err := CreateImage(img, key, CreateOptions{Size: 400 << 20, FS: Ext4, PBKDF: PBKDF2}); err != nil {
				t.Fatal(err)
			}
			im, err := OpenImage(img, key, true)
			if err != nil {
				t.Fatal(err)
			}
			sb := make([]byte, 1024)
			dev := im.Device()
			if _, err := dev.ReadAt(sb, 1024); err != nil {
				t.Fatal(err)
			}
			tc.damage(sb) // the checksum is left as it was: it no longer fits
			if _, err := dev.WriteAt(sb, 1024); err != nil {
				t.Fatal(err)
			}
			if err := im.Close(); err != nil {
				t.Fatal(err)
			}
			im, err = OpenImage(img, key, true)
			if err != nil {
				t.Fatal(err)
			}
			defer im.Close()
			_, err = im.FS()
			switch {
			case tc.wantErr == "" && err != nil:
				t.Fatalf("a torn superblock was not repaired: %v", err)
			case tc.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tc.wantErr)):
				t.Fatalf("FS: %v, want an error saying %q", err, tc.wantErr)
			}
		})
	}
}
