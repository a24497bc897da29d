package ebpfmon

import (
	"regexp"
	"strconv"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/btf"

	"github.com/keygate/keygate/internal/testutil"
)

// TestVerifierHeadroom loads every tracepoint program and checks that the
// verifier explored well under its limit of a million instructions: the path
// and iovec loops are bounded by unrolling, and a change that multiplies
// their states should fail here, not on a kernel with a different verifier.
// It loads both ways the open filter reads files: through bpf_rdonly_cast
// (Linux 6.2+) and through bpf_probe_read_kernel, the path Linux 6.1 takes.
func TestVerifierHeadroom(t *testing.T) {
	testutil.Root(t)
	for _, tc := range []struct {
		name string
		cast bool
	}{
		{"rdonly_cast", true},
		{"probe_read", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.cast && !hasKfunc("bpf_rdonly_cast") {
				testutil.Skip(t, "bpf", "this kernel has no bpf_rdonly_cast kfunc (Linux 6.2+)")
			}
			spec, err := loadMonitor()
			if err != nil {
				t.Fatal(err)
			}
			if err := spec.Variables[monitorVarHaveRdonlyCast].Set(tc.cast); err != nil {
				t.Fatal(err)
			}
			checkHeadroom(t, spec)
		})
	}
}

func checkHeadroom(t *testing.T, spec *ebpf.CollectionSpec) {
	t.Helper()
	var objs monitorObjects
	err := spec.LoadAndAssign(&objs, &ebpf.CollectionOptions{Programs: ebpf.ProgramOptions{LogLevel: ebpf.LogLevelStats}})
	if err != nil {
		testutil.Skip(t, "bpf", "load the BPF programs: "+err.Error())
	}
	defer objs.Close()
	re := regexp.MustCompile(`processed (\d+) insns`)
	progs := map[string]*ebpf.Program{
		"openat_exit": objs.OpenatExit, "openat2_exit": objs.Openat2Exit,
		"vm_readv_enter": objs.VmReadvEnter, "ptrace_enter": objs.PtraceEnter, "pidfd_getfd_enter": objs.PidfdGetfdEnter,
		"perf_enter": objs.PerfEnter,
	}
	for name, p := range progs {
		m := re.FindStringSubmatch(p.VerifierLog)
		if m == nil {
			t.Errorf("%s: no instruction count in the verifier log %q", name, p.VerifierLog)
			continue
		}
		n, _ := strconv.Atoi(m[1])
		t.Logf("%s: verifier processed %d instructions", name, n)
		if n > 100000 {
			t.Errorf("%s: the verifier processed %d instructions, over a tenth of its limit", name, n)
		}
	}
}

// TestHasKfunc checks the kernel BTF lookup that picks the open filter's
// path: a kfunc this kernel has, and names it cannot have.
func TestHasKfunc(t *testing.T) {
	testutil.Root(t)
	if _, err := btf.LoadKernelSpec(); err != nil {
		testutil.Skip(t, "bpf", "no kernel BTF: "+err.Error())
	}
	for _, tc := range []struct {
		name string
		want bool
	}{
		{"vfs_read", true},
		{"keygate_no_such_kfunc", false},
		{"task_struct", false}, // a struct, not a function
	} {
		if got := hasKfunc(tc.name); got != tc.want {
			t.Errorf("hasKfunc(%q) = %v, want %v", tc.name, got, tc.want)
		}
	}
}
