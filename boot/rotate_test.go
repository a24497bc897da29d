package boot

import (
	"bytes"
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/keygate/keygate/disk"
	"github.com/keygate/keygate/disk/luks2"
	"github.com/keygate/keygate/internal/testutil"
	"github.com/keygate/keygate/keysvc"
	"github.com/keygate/keygate/keysvc/api"
	"github.com/keygate/keygate/tpm"
)

// rotationVolume makes an image whose UK the test knows (imported at the
// key service, as `keysvc volume import` does), for VM vm, with a file on
// it.
func (e *env) rotationVolume(t *testing.T, tp *tpm.TPM, vm, id string) (img string, uk []byte) {
	t.Helper()
	uk = bytes.Repeat([]byte{0x5c}, api.UKSize) // a test key, not a secret
	img = filepath.Join(t.TempDir(), id+".img")
	tok := luks2.KeygateToken{URL: e.url(), VolumeID: id, CASHA256: pinFor(e.ca, "")}
	c, err := createImage(img, uk, tok, disk.CreateOptions{Size: 64 << 20, FS: disk.FAT32})
	if err != nil {
		t.Fatal(err)
	}
	c.Wipe()
	if _, err := e.adm.AddVolume(context.Background(), api.VolumeRequest{ID: id, VM: vm, Key: bytes.Clone(uk)}); err != nil {
		t.Fatal(err)
	}
	// A file written before the rotation must read back after it.
	b, err := Run(context.Background(), e.cfg(tp, vm, img, nil))
	if err != nil {
		t.Fatalf("first boot: %v", err)
	}
	const text = "kept across the rotation\n"
	if err := b.FS().Put("/kept.txt", strings.NewReader(text), int64(len(text))); err != nil {
		t.Fatal(err)
	}
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	return img, uk
}

// reboot restarts the simulator: PCRs back to reset, as a VM reboot.
func reboot(t *testing.T, tp *tpm.TPM) {
	t.Helper()
	if err := tp.Reboot(); err != nil {
		t.Fatal(err)
	}
}

// bootAndCheck boots the VM and checks the file written before the
// rotation; it returns the events seen.
func (e *env) bootAndCheck(t *testing.T, tp *tpm.TPM, vm, img string) *events {
	t.Helper()
	ev := newEvents()
	b, err := Run(context.Background(), e.cfg(tp, vm, img, ev))
	if err != nil {
		t.Fatalf("boot: %v", err)
	}
	defer b.Close()
	var got bytes.Buffer
	if _, err := b.FS().Get("/kept.txt", &got); err != nil || got.String() != "kept across the rotation\n" {
		t.Fatalf("file after rotation: %q %v", got.String(), err)
	}
	return ev
}

// oldKeyRefused checks, with cryptsetup, that uk no longer opens img.
func oldKeyRefused(t *testing.T, img string, uk []byte) {
	t.Helper()
	cs := testutil.LookPath(t, "cryptsetup")
	kf := filepath.Join(t.TempDir(), "old")
	os.WriteFile(kf, uk, 0o600)
	out, err := exec.Command(cs, "open", "--test-passphrase", "--key-file", kf, img).CombinedOutput()
	if err == nil || !strings.Contains(string(out), "No key available") {
		t.Fatalf("cryptsetup with the old UK after the rotation: %v %s, want no key available", err, out)
	}
}

func (e *env) rotationPending(t *testing.T, id string) bool {
	t.Helper()
	vi, err := e.adm.Volume(context.Background(), id)
	if err != nil {
		t.Fatal(err)
	}
	return vi.Rotation == api.RotationPending
}

func seen(ev *events, k EventKind) bool {
	for _, x := range ev.kinds() {
		if x == k {
			return true
		}
	}
	return false
}

// TestRotateThroughBoot: `keysvc volume rotate`, then keygate boot: the
// image is re-keyed, the service destroys the old UK, cryptsetup no longer
// opens the image with it, and the next boot opens it with the service's
// (new) key, data intact.
func TestRotateThroughBoot(t *testing.T) {
	e := startEnv(t)
	tp := openSim(t)
	e.enroll(t, tp, "rb", false)
	img, uk := e.rotationVolume(t, tp, "rb", "rb-vol")
	if _, err := e.adm.RotateVolume(context.Background(), "rb-vol"); err != nil {
		t.Fatal(err)
	}
	if !e.rotationPending(t, "rb-vol") {
		t.Fatal("rotation not pending after rotate")
	}
	reboot(t, tp)
	ev := e.bootAndCheck(t, tp, "rb", img)
	if !seen(ev, EventRotated) || seen(ev, EventRotation) {
		t.Fatalf("events %v, want rotated and no failure", ev.kinds())
	}
	if e.rotationPending(t, "rb-vol") {
		t.Fatal("rotation still pending after the boot confirmed it")
	}
	oldKeyRefused(t, img, uk)
	reboot(t, tp)
	if ev := e.bootAndCheck(t, tp, "rb", img); seen(ev, EventRotated) {
		t.Fatal("a second boot rotated again")
	}
}

// TestRotateCrashVM: a crash of the VM after each step of the rotation
// (disk steps, and the confirmation) leaves an image that opens, and the
// next boot completes the rotation.
func TestRotateCrashVM(t *testing.T) {
	for _, step := range []string{disk.RotateAdded, disk.RotatePointed, disk.RotateRemoved, disk.RotateCleared, stepConfirm} {
		t.Run(step, func(t *testing.T) {
			e := startEnv(t)
			tp := openSim(t)
			e.enroll(t, tp, "rc", false)
			img, uk := e.rotationVolume(t, tp, "rc", "rc-vol")
			if _, err := e.adm.RotateVolume(context.Background(), "rc-vol"); err != nil {
				t.Fatal(err)
			}
			reboot(t, tp)
			errCrash := errors.New("power cut")
			rotateFault = func(s string) error {
				if s == step {
					return errCrash
				}
				return nil
			}
			_, err := Run(context.Background(), e.cfg(tp, "rc", img, nil))
			rotateFault = nil
			if !errors.Is(err, errCrash) {
				t.Fatalf("boot with a crash after %s: %v", step, err)
			}
			// The confirmation reached the service before the crash.
			if e.rotationPending(t, "rc-vol") != (step != stepConfirm) {
				t.Fatalf("after a crash at %s the rotation pending is %v", step, !(step != stepConfirm))
			}
			reboot(t, tp)
			ev := e.bootAndCheck(t, tp, "rc", img)
			if seen(ev, EventRotated) != (step != stepConfirm) || seen(ev, EventRotation) {
				t.Fatalf("events after the crash at %s: %v", step, ev.kinds())
			}
			if e.rotationPending(t, "rc-vol") {
				t.Fatal("rotation still pending after the second boot")
			}
			oldKeyRefused(t, img, uk)
		})
	}
}

// TestRotateCrashService: a key service that fails at each of its steps
// (an injected fault, a 500) leaves the VM booting with a key that opens
// the image, and a later boot completes the rotation.
func TestRotateCrashService(t *testing.T) {
	var failAt atomic.Value
	failAt.Store("")
	faults := keysvc.WithFaults(func(step string) error {
		if failAt.Load() == step {
			return errors.New("injected")
		}
		return nil
	})
	for _, step := range []string{keysvc.FaultReleasePending, keysvc.FaultConfirmProven, keysvc.FaultConfirmDone} {
		t.Run(step, func(t *testing.T) {
			e := startEnv(t, faults)
			tp := openSim(t)
			e.enroll(t, tp, "rs", false)
			img, uk := e.rotationVolume(t, tp, "rs", "rs-vol")
			if _, err := e.adm.RotateVolume(context.Background(), "rs-vol"); err != nil {
				t.Fatal(err)
			}
			reboot(t, tp)
			failAt.Store(step)
			ev := newEvents()
			cfg := e.cfg(tp, "rs", img, ev)
			cfg.MaxWait = 500 * time.Millisecond
			b, err := Run(context.Background(), cfg)
			failAt.Store("")
			switch step {
			case keysvc.FaultReleasePending:
				// No key is released: the boot waits, then gives up.
				var ue *UnreachableError
				if !errors.As(err, &ue) {
					t.Fatalf("boot with the release failing: %v, want unreachable", err)
				}
			default:
				// The image is re-keyed; the confirmation failed; the
				// volume serves all the same, with the new key.
				if err != nil {
					t.Fatalf("boot with the confirmation failing: %v", err)
				}
				b.Close()
				if !seen(ev, EventRotation) || seen(ev, EventRotated) {
					t.Fatalf("events %v, want a rotation left for later", ev.kinds())
				}
			}
			if e.rotationPending(t, "rs-vol") != (step != keysvc.FaultConfirmDone) {
				t.Fatalf("rotation pending %v after a fault at %s", e.rotationPending(t, "rs-vol"), step)
			}
			reboot(t, tp)
			ev = e.bootAndCheck(t, tp, "rs", img)
			if e.rotationPending(t, "rs-vol") {
				t.Fatalf("rotation still pending after the next boot (events %v)", ev.kinds())
			}
			oldKeyRefused(t, img, uk)
		})
	}
}
