package disk

import (
	"os"
	"path/filepath"
	"testing"
	"unsafe"

	"github.com/keygate/keygate/keymem"
)

func registered(b []byte) bool {
	lo := uint64(uintptr(unsafe.Pointer(&b[0])))
	hi := lo + uint64(len(b))
	for _, r := range keymem.Default.Ranges() {
		if r.Start <= lo && hi <= r.End {
			return true
		}
	}
	return false
}

// TestKeyPagesRegistered: a Key is in the key-page registry (which a
// monitor of this process follows) from creation to Destroy, and an open
// image's keys (the key schedule) until Close; nothing is left after.
func TestKeyPagesRegistered(t *testing.T) {
	kf := filepath.Join(t.TempDir(), "key")
	if err := os.WriteFile(kf, []byte("key file bytes"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		key  func(t *testing.T) *Key
	}{
		{"NewKey", func(t *testing.T) *Key {
			k, err := NewKey([]byte("passphrase"))
			if err != nil {
				t.Fatal(err)
			}
			return k
		}},
		{"ReadKeyFile", func(t *testing.T) *Key {
			k, err := ReadKeyFile(kf)
			if err != nil {
				t.Fatal(err)
			}
			return k
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := len(keymem.Default.Ranges())
			k := tc.key(t)
			if !registered(k.Bytes()) {
				t.Fatal("key not in the registry")
			}
			img := filepath.Join(t.TempDir(), "v.img")
			if _, err := CreateImage(img, k, CreateOptions{Size: 32 << 20, PBKDF: PBKDF2}); err != nil {
				t.Fatal(err)
			}
			im, err := OpenImage(img, k, false)
			if err != nil {
				t.Fatal(err)
			}
			if n := len(keymem.Default.Ranges()); n != before+2 {
				t.Fatalf("%d ranges registered with the key and an open image, want %d (key, key schedule)", n, before+2)
			}
			im.Close()
			k.Destroy()
			k.Destroy()
			if n := len(keymem.Default.Ranges()); n != before {
				t.Fatalf("%d ranges registered after Close and Destroy, %d before", n, before)
			}
		})
	}
}
