package disk_test

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/keygate/keygate/disk"
)

// TestSyncErrorIsSticky: once an fdatasync of the image fails, every later
// sync of it fails too, on each path a durable write takes (the Device
// under the filesystem, a file's fsync through the filesystem, the block
// export's FLUSH), and so does closing. Linux reports a writeback error to
// one fdatasync and marks the pages it failed to write clean; a database
// that retries its commit's fsync would otherwise be told the lost commit
// is durable.
func TestSyncErrorIsSticky(t *testing.T) {
	for _, tc := range []struct {
		name string
		// open returns a write of 4 KiB, a sync and a close on a fresh
		// image, through one path.
		open func(t *testing.T, im *disk.Image) (write func() error, sync, close func() error)
	}{
		{"device", func(t *testing.T, im *disk.Image) (func() error, func() error, func() error) {
			d := im.Device()
			return func() error { _, err := d.WriteAt(make([]byte, 4096), 1<<20); return err }, d.Sync, im.Close
		}},
		{"file fsync", func(t *testing.T, im *disk.Image) (func() error, func() error, func() error) {
			fsys, err := im.FS()
			if err != nil {
				t.Fatal(err)
			}
			f, err := fsys.OpenFile("/db", os.O_RDWR|os.O_CREATE)
			if err != nil {
				t.Fatal(err)
			}
			off := int64(0)
			write := func() error { _, err := f.WriteAt(make([]byte, 4096), off); off += 4096; return err }
			return write, f.Sync, func() error {
				f.Close()
				return im.Close()
			}
		}},
		{"blocks flush", func(t *testing.T, im *disk.Image) (func() error, func() error, func() error) {
			b := im.Blocks()
			return func() error { _, err := b.WriteAt(make([]byte, 4096), 1<<20); return err }, b.Sync, im.Close
		}},
	} {
		for _, inject := range []bool{false, true} {
			name := tc.name + "/healthy"
			if inject {
				name = tc.name + "/writeback error"
			}
			t.Run(name, func(t *testing.T) {
				dir := t.TempDir()
				path := filepath.Join(dir, "v.img")
				key := writeKey(t, dir, "k", "sync-error-test")
				if _, err := disk.CreateImage(path, key, disk.CreateOptions{Size: 32 << 20, FS: disk.Ext4, PBKDF: disk.PBKDF2}); err != nil {
					t.Fatal(err)
				}
				im, err := disk.OpenImage(path, key, true)
				if err != nil {
					t.Fatal(err)
				}
				write, sync, closeIt := tc.open(t, im)
				if err := write(); err != nil {
					t.Fatal(err)
				}
				if inject {
					disk.FailNextSync(im.Device(), syscall.EIO)
				}
				for i := range 3 {
					err := sync()
					if !inject {
						if err != nil {
							t.Fatalf("sync %d of a healthy image: %v", i, err)
						}
					} else if !errors.Is(err, syscall.EIO) || !strings.Contains(err.Error(), "e2fsck") {
						t.Fatalf("sync %d after a writeback error: %v, want EIO saying to check the volume", i, err)
					}
					if err := write(); err != nil && !inject {
						t.Fatal(err)
					}
				}
				err = closeIt()
				if inject != (err != nil) || inject && !errors.Is(err, syscall.EIO) {
					t.Fatalf("close (writeback error %v): %v", inject, err)
				}
			})
		}
	}
}
