package boot

import (
	"context"
	"errors"
	"net/http"
	"os"
	"testing"

	"github.com/keygate/keygate/disk"
	"github.com/keygate/keygate/disk/luks2"
	"github.com/keygate/keygate/keysvc/api"
	"github.com/keygate/keygate/keysvc/client"
)

// keyslotCount is how many keyslots img has.
func keyslotCount(t *testing.T, img string) int {
	t.Helper()
	f, err := os.Open(img)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	v, err := luks2.Open(f)
	if err != nil {
		t.Fatal(err)
	}
	return len(v.Keyslots())
}

// TestRotateCancelThroughBoot: `keysvc volume rotate --cancel` in every
// order with the VM's side of the rotation. Before the pending key was
// released the cancel destroys it at once. After it was released, the
// cancel waits for the VM: one whose image still opens with the current
// key (a crash after the new keyslot was added, or the token pointed)
// drops the new keyslot and confirms with the current key, which ends the
// cancel; one whose image opens with the new key alone (a crash after the
// old keyslot was removed) completes the rotation instead, which the
// service accepts. A crash inside the undo is finished by the next boot.
// Once the VM confirmed, there is nothing left to cancel. In every case
// the image keeps opening, its file intact, with the key the service
// holds at the end.
func TestRotateCancelThroughBoot(t *testing.T) {
	for _, tc := range []struct {
		name      string
		crashAt   string // the VM's crash in the boot that got the pending key; "" for no such boot
		dropCrash string // a crash inside the undo, in the next boot
		completes bool   // the rotation completes despite the cancel
		tooLate   bool   // the VM confirmed before the cancel: 409
	}{
		{name: "before-release"},
		{name: "after-added", crashAt: disk.RotateAdded},
		{name: "after-pointed", crashAt: disk.RotatePointed},
		{name: "after-pointed-undo-crashes", crashAt: disk.RotatePointed, dropCrash: disk.RotateRemoved},
		{name: "after-removed", crashAt: disk.RotateRemoved, completes: true},
		{name: "after-cleared", crashAt: disk.RotateCleared, completes: true},
		{name: "after-confirm", crashAt: stepConfirm, tooLate: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := context.Background()
			e := startEnv(t)
			tp := openSim(t)
			e.enroll(t, tp, "cx", false)
			img, uk := e.rotationVolume(t, tp, "cx", "cx-vol")
			slots := keyslotCount(t, img)
			if _, err := e.adm.RotateVolume(ctx, "cx-vol"); err != nil {
				t.Fatal(err)
			}
			if tc.crashAt != "" {
				reboot(t, tp)
				errCrash := errors.New("power cut")
				rotateFault = func(s string) error {
					if s == tc.crashAt {
						return errCrash
					}
					return nil
				}
				_, err := Run(ctx, e.cfg(tp, "cx", img, nil))
				rotateFault = nil
				if !errors.Is(err, errCrash) {
					t.Fatalf("boot with a crash after %s: %v", tc.crashAt, err)
				}
			}
			vi, err := e.adm.CancelRotation(ctx, "cx-vol")
			var he *client.Error
			switch {
			case tc.tooLate:
				if !errors.As(err, &he) || he.StatusCode != http.StatusConflict {
					t.Fatalf("cancel after the confirmation: %+v %v, want 409", vi, err)
				}
			case err != nil:
				t.Fatalf("cancel: %v", err)
			case tc.crashAt == "" && vi.Rotation != "":
				t.Fatalf("cancel before release: %+v, want the pending key destroyed at once", vi)
			case tc.crashAt != "" && vi.Rotation != api.RotationCancelling:
				t.Fatalf("cancel after release: %+v, want cancelling", vi)
			}
			if tc.dropCrash != "" {
				reboot(t, tp)
				errCrash := errors.New("power cut in the undo")
				rotateFault = func(s string) error {
					if s == tc.dropCrash {
						return errCrash
					}
					return nil
				}
				_, err := Run(ctx, e.cfg(tp, "cx", img, nil))
				rotateFault = nil
				if !errors.Is(err, errCrash) {
					t.Fatalf("boot with a crash in the undo after %s: %v", tc.dropCrash, err)
				}
			}
			reboot(t, tp)
			ev := e.bootAndCheck(t, tp, "cx", img)
			if got, _ := e.adm.Volume(ctx, "cx-vol"); got.Rotation != "" {
				t.Fatalf("after the boot the volume shows rotation %q", got.Rotation)
			}
			switch {
			case tc.completes, tc.tooLate:
				if tc.completes && !seen(ev, EventRotated) {
					t.Fatalf("events %v, want the rotation completed", ev.kinds())
				}
				oldKeyRefused(t, img, uk)
			case tc.crashAt == "":
				if len(ev.kinds()) == 0 || seen(ev, EventRotated) || seen(ev, EventRotationCancelled) {
					t.Fatalf("events %v, want no rotation at all", ev.kinds())
				}
			default:
				if !seen(ev, EventRotationCancelled) || seen(ev, EventRotated) {
					t.Fatalf("events %v, want the cancel completed", ev.kinds())
				}
			}
			if !tc.completes && !tc.tooLate {
				if n := keyslotCount(t, img); n != slots {
					t.Fatalf("%d keyslots after the cancel, want the %d from before the rotation", n, slots)
				}
			}
			// The next boot opens with the key the service holds, and
			// does nothing more.
			reboot(t, tp)
			if ev := e.bootAndCheck(t, tp, "cx", img); seen(ev, EventRotated) || seen(ev, EventRotationCancelled) || seen(ev, EventRotation) {
				t.Fatalf("a later boot did rotation work: %v", ev.kinds())
			}
		})
	}
}
