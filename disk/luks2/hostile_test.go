package luks2

import (
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// hostileImageSize leaves room for a data segment after a 128 MiB keyslots
// area; the file is sparse.
const hostileImageSize = 200 << 20

// bigKeyslotsArea moves the data segment behind a keyslots area of
// cryptsetup's maximum size, so that a keyslot area can claim 64 MiB.
func bigKeyslotsArea(tree map[string]any) {
	obj(tree, "config")["keyslots_size"] = strconv.Itoa(maxKeyslotsSize)
	obj(tree, "segments", "0")["offset"] = strconv.Itoa(2*0x4000 + maxKeyslotsSize)
	obj(tree, "keyslots", "0", "area")["size"] = strconv.Itoa(64 << 20)
}

func stripes(n float64) func(map[string]any) {
	return func(tree map[string]any) { obj(tree, "keyslots", "0", "af")["stripes"] = n }
}

// TestHostileHeadersRefused: headers whose keyslot would make Unlock size
// a locked buffer from the header are refused by Open, with a HeaderError
// that names the failed check and the field.
func TestHostileHeadersRefused(t *testing.T) {
	for _, tc := range []struct {
		name string
		edit func(map[string]any)
		want string // in the error
	}{
		{"stripes 2^20 in a 64 MiB area", func(tree map[string]any) {
			bigKeyslotsArea(tree)
			stripes(1 << 20)(tree)
		}, "af stripes 1048576"},
		{"stripes 2^40 in a 64 MiB area", func(tree map[string]any) {
			bigKeyslotsArea(tree)
			stripes(1 << 40)(tree)
		}, "af stripes 1099511627776"},
		{"stripes 4001", stripes(4001), "af stripes 4001"},
		{"stripes 3999", stripes(3999), "af stripes 3999"},
		{"stripes 1", stripes(1), "af stripes 1"},
		{"stripes 0", stripes(0), "af stripes 0"},
		{"stripes -1", stripes(-1), "af stripes -1"},
		{"key size 513", func(tree map[string]any) {
			bigKeyslotsArea(tree)
			obj(tree, "keyslots", "0")["key_size"] = float64(513)
		}, "key_size 513"},
		{"area smaller than the split key", func(tree map[string]any) {
			obj(tree, "keyslots", "0", "area")["size"] = strconv.Itoa(4096)
		}, "area size 4096"},
		{"keyslots area over 128 MiB", func(tree map[string]any) {
			bigKeyslotsArea(tree)
			obj(tree, "config")["keyslots_size"] = strconv.Itoa(maxKeyslotsSize + 4096)
		}, "keyslots_size"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			img := hostileImage(t, tc.edit)
			f, err := os.Open(img)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			v, err := Open(f)
			if err == nil {
				vk, _, uerr := v.Unlock([]byte("pw"))
				if uerr == nil {
					vk.Destroy()
				}
				t.Fatalf("Open accepted the header (Unlock: %v)", uerr)
			}
			var both *BothCopiesError
			if !errors.As(err, &both) || both.Primary.Check != CheckMetadata || both.Secondary == nil || both.Secondary.Check != CheckMetadata {
				t.Fatalf("Open: %v; want the %s check to fail in both copies", err, CheckMetadata)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Open: %v; want it to name %q", err, tc.want)
			}
		})
	}
}

// TestLargestValidKeyslotUnlocks: the largest keyslot the checks let
// through (a 64 MiB area in a 128 MiB keyslots area, 4000 stripes) still
// opens, so the checks above refuse the stripe count, not the sizes.
func TestLargestValidKeyslotUnlocks(t *testing.T) {
	img := hostileImage(t, bigKeyslotsArea)
	f, err := os.Open(img)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	v, err := Open(f)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	vk, slot, err := v.Unlock([]byte("pw"))
	if err != nil {
		t.Fatalf("Unlock: %v", err)
	}
	vk.Destroy()
	if slot != 0 {
		t.Fatalf("opened slot %d, want 0", slot)
	}
}

// hostileImage formats a sparse image with passphrase "pw" and rewrites its
// metadata with edit.
func hostileImage(t *testing.T, edit func(map[string]any)) string {
	t.Helper()
	img := filepath.Join(t.TempDir(), "img")
	f, err := os.Create(img)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(hostileImageSize); err != nil {
		t.Fatal(err)
	}
	_, vk, err := Format(f, []byte("pw"), FormatOptions{PBKDF: KeyPBKDF(), DigestIterations: 1000})
	if err != nil {
		t.Fatal(err)
	}
	vk.Destroy()
	f.Close()
	rewriteJSON(t, img, edit)
	return img
}
