package disk_test

import (
	"bytes"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/keygate/keygate/disk"
	"github.com/keygate/keygate/disk/luks2"
	"github.com/keygate/keygate/internal/testutil"
)

// Test keys, not secrets.
var (
	rotOld = bytes.Repeat([]byte{0x11}, 32)
	rotNew = bytes.Repeat([]byte{0x22}, 32)
)

var (
	rotBaseOnce sync.Once
	rotBase     string // image with the old UK in a keygate-token keyslot and a recovery keyslot
	rotRecovery []byte
	rotBaseErr  error
)

// rotationImage copies a base image, made once, to a fresh path. The old UK's keyslot is named
// by a keygate token, as `keygate disk create --keysvc` makes it; without
// withToken the token is removed.
func rotationImage(t *testing.T, withToken bool) string {
	t.Helper()
	rotBaseOnce.Do(func() {
		dir, err := os.MkdirTemp("", "keygate-rotate-base-")
		if err != nil {
			rotBaseErr = err
			return
		}
		rotBase = filepath.Join(dir, "base.img")
		c, err := disk.CreateImage(rotBase, mustKey(t, rotOld), disk.CreateOptions{Size: 20 << 20, PBKDF: disk.PBKDF2})
		if err != nil {
			rotBaseErr = err
			return
		}
		c.Wipe()
		// A recovery keyslot as --recovery makes it (argon2id), with costs
		// cut so that the many failed tries of other keys stay cheap.
		rotRecovery = []byte("abcdef-ghjkmn-pqrstu")
		rotBaseErr = withLUKS(rotBase, func(v *luks2.Volume) error {
			vk, _, err := v.Unlock(rotOld)
			if err != nil {
				return err
			}
			defer vk.Destroy()
			if _, err := v.AddKeyslot(vk, rotRecovery, luks2.PBKDF{Type: "argon2id", Time: 1, MemoryKiB: 8 << 10, Parallel: 1}); err != nil {
				return err
			}
			tok, err := luks2.KeygateToken{Keyslot: 0, URL: "https://keysvc.example:8443", VolumeID: "v", CASHA256: strings.Repeat("ab", 32)}.Token()
			if err != nil {
				return err
			}
			_, err = v.AddToken(tok)
			return err
		})
	})
	if rotBaseErr != nil {
		t.Fatalf("base image: %v", rotBaseErr)
	}
	b, err := os.ReadFile(rotBase)
	if err != nil {
		t.Fatal(err)
	}
	img := filepath.Join(t.TempDir(), "v.img")
	if err := os.WriteFile(img, b, 0o600); err != nil {
		t.Fatal(err)
	}
	if !withToken {
		if err := withLUKS(img, func(v *luks2.Volume) error { return v.RemoveToken(0) }); err != nil {
			t.Fatal(err)
		}
	}
	return img
}

func TestMain(m *testing.M) {
	code := m.Run()
	if rotBase != "" {
		os.RemoveAll(filepath.Dir(rotBase))
	}
	os.Exit(code)
}

func withLUKS(path string, fn func(*luks2.Volume) error) error {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	v, err := luks2.Open(f)
	if err != nil {
		return err
	}
	return fn(v)
}

func mustKey(t testing.TB, b []byte) *disk.Key {
	t.Helper()
	k, err := disk.NewKey(bytes.Clone(b))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(k.Destroy)
	return k
}

// opens reports whether key opens one of the image's pbkdf2 keyslots (the
// argon2 recovery keyslot is left out: trying it costs a second; the
// cryptsetup check tries every keyslot once).
func opens(t *testing.T, img string, key []byte) bool {
	t.Helper()
	ok := false
	withLUKS(img, func(v *luks2.Volume) error {
		for _, ks := range v.Keyslots() {
			if ks.PBKDF == nil || ks.PBKDF.Type != "pbkdf2" {
				continue
			}
			if vk, err := v.UnlockSlot(ks.ID, key); err == nil {
				vk.Destroy()
				ok = true
			}
		}
		return nil
	})
	return ok
}

// keyslotsOf is the image's keyslots and the keygate token's slots.
func keyslotsOf(t *testing.T, img string) (slots []luks2.KeyslotInfo, token []int) {
	t.Helper()
	err := withLUKS(img, func(v *luks2.Volume) error {
		slots = v.Keyslots()
		if _, kt, err := v.FindKeygateToken(); err == nil {
			token = []int{kt.Keyslot}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return slots, token
}

var errCrash = errors.New("crash")

// TestRotateKey interrupts a rotation after each step, checks that the
// image still opens with a key the service holds at that point, resumes,
// and checks the end state: the new UK opens the image, the old one does
// not (in cryptsetup too), the token names the new keyslot, and the
// recovery keyslot is the one it was.
func TestRotateKey(t *testing.T) {
	steps := []string{disk.RotateAdded, disk.RotatePointed, disk.RotateRemoved, disk.RotateCleared}
	for _, tc := range []struct {
		name    string
		crashAt string // "" runs through
		token   bool
	}{
		{name: "through", token: true},
		{name: "crash-after-added", crashAt: disk.RotateAdded, token: true},
		{name: "crash-after-pointed", crashAt: disk.RotatePointed, token: true},
		{name: "crash-after-removed", crashAt: disk.RotateRemoved, token: true},
		{name: "crash-after-cleared", crashAt: disk.RotateCleared, token: true},
		{name: "no-token", token: false},
		{name: "no-token-crash-after-added", crashAt: disk.RotateAdded, token: false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			img := rotationImage(t, tc.token)
			before, _ := keyslotsOf(t, img)
			recovery := before[1]
			res, err := disk.RotateKey(img, mustKey(t, rotOld), mustKey(t, rotNew), disk.RotateOptions{After: func(step string) error {
				if step == tc.crashAt {
					return errCrash
				}
				return nil
			}})
			if tc.crashAt != "" {
				if !errors.Is(err, errCrash) {
					t.Fatalf("RotateKey: %v, want the injected crash", err)
				}
				crashed := slices.Index(steps, tc.crashAt)
				// The key service holds both UKs until keygate confirms, which
				// it does only after RotateKey returns: at least one must open.
				oldOpens, newOpens := opens(t, img, rotOld), opens(t, img, rotNew)
				if !newOpens {
					t.Fatalf("after %s the new UK does not open the image", tc.crashAt)
				}
				if oldOpens != (crashed < slices.Index(steps, disk.RotateRemoved)) {
					t.Fatalf("after %s the old UK opens: %v", tc.crashAt, oldOpens)
				}
				res, err = disk.RotateKey(img, mustKey(t, rotOld), mustKey(t, rotNew), disk.RotateOptions{})
			}
			if err != nil {
				t.Fatalf("RotateKey: %v", err)
			}
			if opens(t, img, rotOld) || !opens(t, img, rotNew) {
				t.Fatal("after the rotation the old UK opens, or the new one does not")
			}
			slots, token := keyslotsOf(t, img)
			if len(slots) != 2 {
				t.Fatalf("keyslots after rotation: %+v, want the new one and the recovery one", slots)
			}
			if tc.token && (len(token) != 1 || token[0] != res.NewSlot) {
				t.Fatalf("token names %v, want keyslot %d", token, res.NewSlot)
			}
			if !slices.ContainsFunc(slots, func(k luks2.KeyslotInfo) bool {
				return k.ID == recovery.ID && k.AreaOffset == recovery.AreaOffset && k.PBKDF.Type == "argon2id"
			}) {
				t.Fatalf("the recovery keyslot %+v is gone or moved: %+v", recovery, slots)
			}
			// Done is done: again, it changes nothing.
			again, err := disk.RotateKey(img, mustKey(t, rotOld), mustKey(t, rotNew), disk.RotateOptions{})
			if err != nil || len(again.Steps) != 0 || again.NewSlot != res.NewSlot {
				t.Fatalf("rotating a rotated image: %+v %v, want nothing done", again, err)
			}
			if tc.name == "through" {
				checkCryptsetup(t, img)
			}
		})
	}
}

// checkCryptsetup: cryptsetup agrees on the keys after a rotation.
func checkCryptsetup(t *testing.T, img string) { checkCryptsetupKeys(t, img, rotNew, rotOld) }

// checkCryptsetupKeys: cryptsetup opens img with kept and the recovery
// passphrase, and not with gone, and the token names no retired keyslot.
func checkCryptsetupKeys(t *testing.T, img string, kept, gone []byte) {
	cs := testutil.LookPath(t, "cryptsetup")
	dir := t.TempDir()
	for _, k := range []struct {
		name  string
		key   []byte
		opens bool
	}{{"gone", gone, false}, {"kept", kept, true}, {"recovery", rotRecovery, true}} {
		f := filepath.Join(dir, k.name)
		os.WriteFile(f, k.key, 0o600)
		out, err := exec.Command(cs, "open", "--test-passphrase", "--key-file", f, img).CombinedOutput()
		if (err == nil) != k.opens {
			t.Errorf("cryptsetup open --test-passphrase with the %s key: %v %s, want opens=%v", k.name, err, out, k.opens)
		}
	}
	out, err := exec.Command(cs, "token", "export", "--token-id", "0", img).CombinedOutput()
	if err != nil || strings.Contains(string(out), "keygate_retired_keyslot") || !strings.Contains(string(out), `"keygate_volume":"v"`) {
		t.Errorf("cryptsetup token export: %v %s", err, out)
	}
}

// TestRotateKeyResumeWithNewKeyOnly: once the key service completed the
// rotation it hands out the new UK alone; a run interrupted after the old
// keyslot went is finished with it.
func TestRotateKeyResumeWithNewKeyOnly(t *testing.T) {
	img := rotationImage(t, true)
	_, err := disk.RotateKey(img, mustKey(t, rotOld), mustKey(t, rotNew), disk.RotateOptions{After: func(step string) error {
		if step == disk.RotateRemoved {
			return errCrash
		}
		return nil
	}})
	if !errors.Is(err, errCrash) {
		t.Fatal(err)
	}
	res, err := disk.RotateKey(img, nil, mustKey(t, rotNew), disk.RotateOptions{})
	if err != nil || !slices.Equal(res.Steps, []string{disk.RotatePointed}) {
		t.Fatalf("resume with the new key only: %+v %v, want the token cleared", res, err)
	}
	if _, token := keyslotsOf(t, img); len(token) != 1 || token[0] != res.NewSlot {
		t.Fatalf("token names %v, want %d", token, res.NewSlot)
	}
}

// TestRotateKeyWrongKeys: keys that open nothing change nothing.
func TestRotateKeyWrongKeys(t *testing.T) {
	img := rotationImage(t, true)
	before, err := os.ReadFile(img)
	if err != nil {
		t.Fatal(err)
	}
	other := bytes.Repeat([]byte{0x33}, 32)
	for _, cur := range [][]byte{other, nil} {
		var k *disk.Key
		if cur != nil {
			k = mustKey(t, cur)
		}
		if _, err := disk.RotateKey(img, k, mustKey(t, rotNew), disk.RotateOptions{}); !errors.Is(err, disk.ErrRotateKeys) {
			t.Fatalf("RotateKey with a wrong current key: %v, want ErrRotateKeys", err)
		}
	}
	after, _ := os.ReadFile(img)
	if !bytes.Equal(before[:disk.DataOffset], after[:disk.DataOffset]) {
		t.Fatal("a refused rotation changed the header")
	}
}
