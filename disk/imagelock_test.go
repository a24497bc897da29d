package disk_test

import (
	"errors"
	"path/filepath"
	"testing"

	"github.com/keygate/keygate/disk"
)

// TestImageLock: while one command holds an image writable, every other
// open that could write it, or read it mid-write, is refused at once with
// ErrImageBusy; readers share; the lock goes with Close.
func TestImageLock(t *testing.T) {
	dir := t.TempDir()
	key := writeKey(t, dir, "k", "image lock key")
	other := writeKey(t, dir, "k2", "a second key")
	img := filepath.Join(dir, "v.img")
	if _, err := disk.CreateImage(img, key, disk.CreateOptions{Size: 32 << 20, FS: disk.Ext4, PBKDF: disk.PBKDF2}); err != nil {
		t.Fatal(err)
	}
	open := func(writable bool) func() error {
		return func() error {
			im, err := disk.OpenImage(img, key, writable)
			if err == nil {
				im.Close()
			}
			return err
		}
	}
	second := map[string]func() error{
		"open writable":  open(true),
		"open read-only": open(false),
		"add key": func() error {
			_, err := disk.AddKey(img, key, other, disk.PBKDF2)
			return err
		},
		"rotate key": func() error {
			_, err := disk.RotateKey(img, key, other, disk.RotateOptions{})
			return err
		},
		"drop key": func() error {
			_, err := disk.DropKey(img, key, other, disk.RotateOptions{})
			return err
		},
		"remove key": func() error {
			return disk.RemoveKey(img, key, 1, true)
		},
	}
	for _, tc := range []struct {
		holder   string
		writable bool
		free     map[string]bool // second opens that may proceed
	}{
		{"writer", true, nil},
		{"reader", false, map[string]bool{"open read-only": true}},
	} {
		for name, fn := range second {
			t.Run(tc.holder+"/"+name, func(t *testing.T) {
				im, err := disk.OpenImage(img, key, tc.writable)
				if err != nil {
					t.Fatal(err)
				}
				err = fn()
				if tc.free[name] {
					if err != nil {
						t.Errorf("%s beside a %s: %v, want it allowed", name, tc.holder, err)
					}
				} else if !errors.Is(err, disk.ErrImageBusy) {
					t.Errorf("%s beside a %s: %v, want ErrImageBusy", name, tc.holder, err)
				}
				if err := im.Close(); err != nil {
					t.Fatal(err)
				}
				// The lock went with Close: a writer gets in now.
				if err := open(true)(); err != nil {
					t.Errorf("writable open after Close: %v", err)
				}
			})
		}
	}
}
