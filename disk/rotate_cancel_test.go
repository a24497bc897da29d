package disk_test

import (
	"bytes"
	"errors"
	"os"
	"slices"
	"testing"

	"github.com/keygate/keygate/disk"
	"github.com/keygate/keygate/disk/luks2"
)

// TestDropKey: a rotation the key service cancelled is undone wherever
// RotateKey stopped while the old UK still opens the image, and DropKey
// itself resumes after a crash at each of its steps: in the end the old UK
// opens the image and the cancelled one does not (in cryptsetup too), the
// token names the old UK's keyslot, and the recovery keyslot is the one it
// was. Once RotateKey removed the old keyslot, DropKey changes nothing and
// says so (the caller completes the rotation instead).
func TestDropKey(t *testing.T) {
	for _, tc := range []struct {
		name      string
		rotatedTo string // RotateKey's crash point before the cancel; "" for none
		dropCrash string // DropKey's crash point; "" runs through
		token     bool
	}{
		{name: "never-rotated", token: true},
		{name: "after-added", rotatedTo: disk.RotateAdded, token: true},
		{name: "after-pointed", rotatedTo: disk.RotatePointed, token: true},
		{name: "after-pointed-crash-after-pointed", rotatedTo: disk.RotatePointed, dropCrash: disk.RotatePointed, token: true},
		{name: "after-pointed-crash-after-removed", rotatedTo: disk.RotatePointed, dropCrash: disk.RotateRemoved, token: true},
		{name: "after-added-crash-after-cleared", rotatedTo: disk.RotateAdded, dropCrash: disk.RotateCleared, token: true},
		{name: "no-token-after-added", rotatedTo: disk.RotateAdded},
	} {
		t.Run(tc.name, func(t *testing.T) {
			img := rotationImage(t, tc.token)
			before, _ := keyslotsOf(t, img)
			recovery := before[1]
			if tc.rotatedTo != "" {
				_, err := disk.RotateKey(img, mustKey(t, rotOld), mustKey(t, rotNew), disk.RotateOptions{After: func(step string) error {
					if step == tc.rotatedTo {
						return errCrash
					}
					return nil
				}})
				if !errors.Is(err, errCrash) {
					t.Fatalf("RotateKey: %v, want the injected crash", err)
				}
			}
			res, err := disk.DropKey(img, mustKey(t, rotOld), mustKey(t, rotNew), disk.RotateOptions{After: func(step string) error {
				if step == tc.dropCrash {
					return errCrash
				}
				return nil
			}})
			if tc.dropCrash != "" {
				if !errors.Is(err, errCrash) {
					t.Fatalf("DropKey: %v, want the injected crash", err)
				}
				if !opens(t, img, rotOld) {
					t.Fatalf("after DropKey's %s the old UK does not open the image", tc.dropCrash)
				}
				res, err = disk.DropKey(img, mustKey(t, rotOld), mustKey(t, rotNew), disk.RotateOptions{})
			}
			if err != nil {
				t.Fatalf("DropKey: %v", err)
			}
			if !opens(t, img, rotOld) || opens(t, img, rotNew) {
				t.Fatal("after DropKey the old UK does not open the image, or the cancelled one does")
			}
			slots, token := keyslotsOf(t, img)
			if len(slots) != 2 {
				t.Fatalf("keyslots after DropKey: %+v, want the old one and the recovery one", slots)
			}
			if tc.token && (len(token) != 1 || token[0] != res.NewSlot) {
				t.Fatalf("token names %v, want keyslot %d", token, res.NewSlot)
			}
			if !slices.ContainsFunc(slots, func(k luks2.KeyslotInfo) bool {
				return k.ID == recovery.ID && k.AreaOffset == recovery.AreaOffset && k.PBKDF.Type == "argon2id"
			}) {
				t.Fatalf("the recovery keyslot %+v is gone or moved: %+v", recovery, slots)
			}
			again, err := disk.DropKey(img, mustKey(t, rotOld), mustKey(t, rotNew), disk.RotateOptions{})
			if err != nil || len(again.Steps) != 0 {
				t.Fatalf("DropKey again: %+v %v, want nothing done", again, err)
			}
			if tc.token && tc.dropCrash == "" {
				checkCryptsetupKeys(t, img, rotOld, rotNew)
			}
		})
	}
}

// TestDropKeyTooLate: once the old keyslot is removed the image opens
// with the pending UK alone; DropKey refuses with ErrRotateKeys and
// changes nothing.
func TestDropKeyTooLate(t *testing.T) {
	for _, at := range []string{disk.RotateRemoved, ""} {
		img := rotationImage(t, true)
		_, err := disk.RotateKey(img, mustKey(t, rotOld), mustKey(t, rotNew), disk.RotateOptions{After: func(step string) error {
			if step == at {
				return errCrash
			}
			return nil
		}})
		if at != "" && !errors.Is(err, errCrash) || at == "" && err != nil {
			t.Fatalf("RotateKey: %v", err)
		}
		before, _ := os.ReadFile(img)
		if _, err := disk.DropKey(img, mustKey(t, rotOld), mustKey(t, rotNew), disk.RotateOptions{}); !errors.Is(err, disk.ErrRotateKeys) {
			t.Fatalf("DropKey after %q: %v, want ErrRotateKeys", at, err)
		}
		after, _ := os.ReadFile(img)
		if !bytes.Equal(before[:disk.DataOffset], after[:disk.DataOffset]) {
			t.Fatal("a refused DropKey changed the header")
		}
	}
}
