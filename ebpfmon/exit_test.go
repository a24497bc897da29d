package ebpfmon

import (
	"context"
	"errors"
	"os/exec"
	"testing"

	"github.com/cilium/ebpf"

	"github.com/keygate/keygate/internal/testutil"
)

// TestExitForgetsProcess checks that a protected process's entry leaves
// the protected set when it exits (the sched_process_exit program), so that
// a recycled pid is never taken for the key holder. The program tells the
// last thread from signal->live, which every kernel has, not from the
// tracepoint's group_dead field, which Linux 6.1 lacks.
func TestExitForgetsProcess(t *testing.T) {
	testutil.Root(t)
	sleep := testutil.LookPath(t, "sleep")
	m, err := Start(context.Background(), Config{DetectOnly: true})
	if err != nil {
		testutil.Skip(t, "bpf", "start the monitor: "+err.Error())
	}
	defer m.Close()

	cmd := exec.Command(sleep, "600")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	pid := cmd.Process.Pid
	defer cmd.Process.Kill()
	if err := m.Protect(pid, nil); err != nil {
		t.Fatal(err)
	}
	var v monitorProtectedProc
	if err := m.objs.Prot.Lookup(uint32(pid), &v); err != nil {
		t.Fatalf("pid %d is not in the protected set while it runs: %v", pid, err)
	}
	if err := cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	// Wait returns after the child's exit notification, which do_exit sends
	// after the sched_process_exit tracepoint has run.
	_ = cmd.Wait()
	for _, mp := range []struct {
		name string
		m    *ebpf.Map
	}{{"prot", m.objs.Prot}, {"targets", m.objs.Targets}} {
		var b []byte
		if err := mp.m.Lookup(uint32(pid), &b); !errors.Is(err, ebpf.ErrKeyNotExist) {
			t.Errorf("%s still holds exited pid %d (lookup: %v)", mp.name, pid, err)
		}
	}
}
