package ebpfmon_test

import (
	"fmt"
	"strconv"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/keygate/keygate/ebpfmon"
)

// TestFloodCannotHideCritical is the attack on the monitor's ring buffer:
// anyone (even a process that may not read the victim: the event is sent
// whatever the syscall's result) floods it with warnings while the
// monitor's consumer is slow, the kernel drops what does not fit, and a
// critical attempt made then is among the drops. A dropped event may have
// been critical, so the monitor must say so with a critical event of its
// own (events_lost), which --on-alert lock and the key service act on like
// any other; counting the drops (Stats) alone left the volume unlocked and
// the key service unaware.
func TestFloodCannotHideCritical(t *testing.T) {
	// A consumer that takes nothing until the attack is over: the slowest
	// console or sink there is.
	m := startMonitor(t, ebpfmon.Config{EventBuffer: 1})
	v := startVictim(t)
	if err := m.Protect(v.PID, []ebpfmon.Range{v.Key}); err != nil {
		t.Fatal(err)
	}
	// The flood: far more warnings (reads away from the key pages) than
	// the 256 KiB ring buffer holds.
	buf := make([]byte, 8)
	for range 4000 {
		unix.ProcessVMReadv(v.PID, []unix.Iovec{{Base: &buf[0], Len: 8}}, []unix.RemoteIovec{{Base: uintptr(v.Other), Len: 8}}, 0)
	}
	st, err := m.Stats()
	if err != nil {
		t.Fatal(err)
	}
	if st.Drops == 0 {
		t.Fatalf("no drops after 4000 events with nobody reading: the flood did not fill the ring buffer (%+v)", st)
	}
	// The attack the flood hides: a read of the key pages.
	atk := runAttack(t, "vm_readv", strconv.Itoa(v.PID), fmt.Sprintf("%#x", v.Key.Start))
	if atk.Err != "" {
		t.Logf("the attacker's read failed (%s); it is flagged all the same", atk.Err)
	}
	// Then a marker, once the queue has room again: the kernel's ring
	// buffer keeps its order, so everything recorded before the marker has
	// been seen when the marker arrives.
	var sawAttack, sawLost bool
	deadline := time.After(60 * time.Second)
	marker := 0
	for done := false; !done; {
		select {
		case e, ok := <-m.Events():
			if !ok {
				t.Fatal("events channel closed")
			}
			switch {
			case e.TGID == atk.PID && e.Severity == ebpfmon.Critical:
				sawAttack = true
			case e.Technique == ebpfmon.EventsLost:
				if e.Severity != ebpfmon.Critical {
					t.Errorf("events_lost with severity %s, want critical", e.Severity)
				}
				if e.Arg == 0 {
					t.Errorf("events_lost says 0 events were lost: %+v", e)
				}
				t.Logf("%s", e)
				sawLost = true
			case marker != 0 && e.TGID == marker:
				done = true
			}
		case <-deadline:
			t.Fatalf("the marker's event did not come within 60s (attack seen %v, events_lost seen %v)", sawAttack, sawLost)
		}
		if marker == 0 && len(m.Events()) == 0 {
			marker = runAttack(t, "ptrace_seize", strconv.Itoa(v.PID)).PID
		}
	}
	if !sawLost && !sawAttack {
		t.Fatalf("the critical read of the key by pid %d was dropped (%d drops so far) and no critical events_lost event said so", atk.PID, st.Drops)
	}
	if !sawLost {
		t.Errorf("the kernel dropped %d events but no events_lost event came", st.Drops)
	}
}
