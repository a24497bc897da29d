package disk_test

import (
	"bytes"
	"crypto/rand"
	"os"
	"path/filepath"
	"testing"

	"github.com/keygate/keygate/disk"
)

// TestBlocksDirectReads: whole-sector reads into aligned buffers bypass the
// page cache (the image is on ext4 or tmpfs here, both take O_DIRECT), and every read, direct or not, returns what was acknowledged, including
// writes still dirty in the page cache (the kernel writes a direct read's
// range back first).
func TestBlocksDirectReads(t *testing.T) {
	for _, tc := range []struct {
		name string
		ss   int
	}{
		{"4 KiB sectors", 4096},
		{"512-byte sectors", 512},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			key := make([]byte, 32)
			rand.Read(key)
			kf := filepath.Join(dir, "vol.key")
			if err := os.WriteFile(kf, key, 0o600); err != nil {
				t.Fatal(err)
			}
			k, err := disk.ReadKeyFile(kf)
			if err != nil {
				t.Fatal(err)
			}
			defer k.Destroy()
			img := filepath.Join(dir, "vol.img")
			c, err := disk.CreateImage(img, k, disk.CreateOptions{Size: 20 << 20, SectorSize: tc.ss, PBKDF: disk.PBKDF2})
			if err != nil {
				t.Fatal(err)
			}
			c.Wipe()
			im, err := disk.OpenImage(img, k, true)
			if err != nil {
				t.Fatal(err)
			}
			defer im.Close() // again: a no-op after the close below
			b := im.Blocks()
			data := make([]byte, 256<<10)
			rand.Read(data)
			// Buffered writes, not synced: dirty in the page cache.
			if _, err := b.WriteAt(data, 64<<10); err != nil {
				t.Fatal(err)
			}
			for _, r := range []struct {
				name     string
				off, n   int
				misalign int // the buffer starts this far past an aligned one
			}{
				{"4 KiB", 64 << 10, 4096, 0},
				{"all of it", 64 << 10, 256 << 10, 0},
				{"a misaligned buffer", 68 << 10, 8192, 512},
				{"a sector-sized read", 72 << 10, tc.ss, 0},
				{"a partial sector", 64<<10 + 100, 1000, 0},
			} {
				buf := make([]byte, r.n+8192)
				p := buf[r.misalign : r.misalign+r.n]
				if _, err := b.ReadAt(p, int64(r.off)); err != nil {
					t.Fatalf("%s: %v", r.name, err)
				}
				if want := data[r.off-64<<10:][:r.n]; !bytes.Equal(p, want) {
					t.Fatalf("%s: read back differs from what was written", r.name)
				}
			}
			if !disk.BlocksReadDirect(b) {
				t.Fatal("reads do not bypass the page cache (O_DIRECT)")
			}
			// And the ciphertext reached the file: a fresh open reads it.
			if err := b.Sync(); err != nil {
				t.Fatal(err)
			}
			if err := im.Close(); err != nil {
				t.Fatal(err)
			}
			im2, err := disk.OpenImage(img, k, false)
			if err != nil {
				t.Fatal(err)
			}
			defer im2.Close()
			got := make([]byte, len(data))
			if _, err := im2.Blocks().ReadAt(got, 64<<10); err != nil || !bytes.Equal(got, data) {
				t.Fatalf("a second open reads other data (err %v)", err)
			}
		})
	}
}
