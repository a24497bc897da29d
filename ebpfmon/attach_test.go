package ebpfmon

import (
	"maps"
	"slices"
	"strings"
	"testing"

	"github.com/cilium/ebpf"

	"github.com/keygate/keygate/internal/testutil"
)

// TestAttachByMode checks which tracepoints each mode attaches: detect
// mode all of them; deny mode, whose BPF LSM programs report every
// technique, only the two that follow threads of protected processes, since
// any syscall tracepoint puts every syscall of every task on the kernel's
// slow path. This host refuses BPF LSM programs, so the test attaches the
// deny-mode set by hand; the test VM's TestMonitorModes counts the deny-mode
// monitor's perf event fds in the guest.
func TestAttachByMode(t *testing.T) {
	testutil.Root(t)
	for _, tc := range []struct {
		lsm  bool
		want func([]string) string // what is wrong with the attached set, if anything
	}{
		{false, func(got []string) string {
			for _, must := range []string{"sys_enter_process_vm_readv", "sys_enter_ptrace", "sys_exit_openat", "sys_enter_perf_event_open",
				"sys_enter_pidfd_getfd", "sys_exit", "task_newtask", "sched_process_exit"} {
				if !slices.Contains(got, must) {
					return "lacks " + must
				}
			}
			return ""
		}},
		{true, func(got []string) string {
			if !slices.Equal(got, []string{"sched_process_exit", "task_newtask"}) {
				return "want only sched_process_exit and task_newtask"
			}
			return ""
		}},
	} {
		spec, err := monitorSpec()
		if err != nil {
			t.Fatal(err)
		}
		m := &Monitor{}
		if err := spec.LoadAndAssign(&m.objs, nil); err != nil {
			testutil.Skip(t, "bpf", "load the BPF programs: "+err.Error())
		}
		m.progs = map[string]*ebpf.Program{}
		err = m.attach(tc.lsm)
		got := slices.Sorted(maps.Keys(m.progs))
		for _, l := range m.links {
			l.Close()
		}
		m.objs.Close()
		if err != nil {
			t.Fatalf("attach(lsm=%v): %v", tc.lsm, err)
		}
		if why := tc.want(got); why != "" {
			t.Errorf("attach(lsm=%v) attached %s: %s", tc.lsm, strings.Join(got, ", "), why)
		}
		if len(m.links) != len(got) {
			t.Errorf("attach(lsm=%v): %d links for %d programs", tc.lsm, len(m.links), len(got))
		}
	}
}

// TestLSMHooks checks deny mode's hook set against the BPF object: each
// program in enforce.c is attached, each to the hook its section names,
// and none to a hook every open passes (file_open, file_permission,
// inode_permission…: their trampolines alone cost open+close a few per
// cent in the test VM). It needs no kernel; the test VM's TestMonitorModes
// shows the programs load, attach and see every route.
func TestLSMHooks(t *testing.T) {
	spec, err := loadEnforce()
	if err != nil {
		t.Fatal(err)
	}
	inSpec := map[string]string{} // hook -> program
	for name, p := range spec.Programs {
		hook, ok := strings.CutPrefix(p.SectionName, "lsm/")
		if !ok || p.AttachTo != hook {
			t.Errorf("program %s: section %q, attach to %q: want lsm/HOOK", name, p.SectionName, p.AttachTo)
		}
		inSpec[hook] = name
	}
	var attached []string
	for _, h := range lsmHooks(&enforceObjects{}) {
		attached = append(attached, h.hook)
		if _, ok := inSpec[h.hook]; !ok {
			t.Errorf("lsmHooks attaches %s, which no program in enforce.c names", h.hook)
		}
	}
	for hook, prog := range inSpec {
		if !slices.Contains(attached, hook) {
			t.Errorf("program %s (lsm/%s) is never attached by lsmHooks", prog, hook)
		}
	}
	slices.Sort(attached)
	if want := []string{"locked_down", "perf_event_open", "ptrace_access_check"}; !slices.Equal(attached, want) {
		t.Errorf("deny mode attaches %v, want %v: a hook on every open's path costs every open its trampoline", attached, want)
	}
}
