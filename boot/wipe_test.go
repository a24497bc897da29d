package boot

import (
	"errors"
	"net/http"
	"strings"
	"testing"

	"github.com/keygate/keygate/disk"
)

// TestRevokeWipesWithoutWaiting revokes a VM while tearing its export down
// hangs (as it does behind a pread of a disk that stopped answering: disk's
// TestWipeWhileDiskHangs stalls a real one). The lock must not wait for it:
// the keys are wiped and the volume reported locked, and any request the
// export still runs fails with disk.ErrKeyWiped. A lock the user asks for
// (Close) is not bounded: it waits, to keep data.
func TestRevokeWipesWithoutWaiting(t *testing.T) {
	e := startEnv(t)
	stall := make(chan struct{})
	stalled := make(chan struct{}, 1)
	testHookStopServing = func() {
		stalled <- struct{}{}
		<-stall
	}
	released := false
	release := func() {
		if !released {
			released = true
			close(stall)
		}
	}
	t.Cleanup(func() { release(); testHookStopServing = nil })

	b, ev := e.serveNBD(t, "wipe-a")
	blocks := b.im.Blocks()
	if _, err := blocks.WriteAt(make([]byte, 4096), 0); err != nil {
		t.Fatalf("a write before the revoke: %v", err)
	}

	e.admin(t, "POST", "/v1/admin/vms/wipe-a/revoke", nil, http.StatusOK)
	<-stalled
	l := ev.wait(t, EventLocked) // fails after 60 s if the lock waits for the teardown
	if !errors.Is(l.Err, ErrRevoked) {
		t.Fatalf("lock reason %v, want ErrRevoked", l.Err)
	}
	if _, err := blocks.WriteAt(make([]byte, 4096), 0); !errors.Is(err, disk.ErrKeyWiped) {
		t.Errorf("a write while the teardown still waits: %v, want disk.ErrKeyWiped", err)
	}
	if err := b.Wait(); !errors.Is(err, ErrRevoked) {
		t.Errorf("Wait: %v, want ErrRevoked", err)
	}
	if err := b.Close(); err == nil || !strings.Contains(err.Error(), "keys were wiped without waiting") {
		t.Errorf("Close: %v, want the forced wipe reported", err)
	}
	release()
	<-b.tornDown
}
