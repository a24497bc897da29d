package ebpfmon

import (
	"regexp"
	"strconv"
	"testing"

	"github.com/cilium/ebpf"

	"github.com/keygate/keygate/internal/testutil"
)

// TestVerifierHeadroom loads every tracepoint program and checks that the
// verifier explored well under its limit of a million instructions: the path
// and iovec loops are bounded by unrolling, and a change that multiplies
// their states should fail here, not on a kernel with a different verifier.
func TestVerifierHeadroom(t *testing.T) {
	testutil.Root(t)
	spec, err := loadMonitor()
	if err != nil {
		t.Fatal(err)
	}
	var objs monitorObjects
	err = spec.LoadAndAssign(&objs, &ebpf.CollectionOptions{Programs: ebpf.ProgramOptions{LogLevel: ebpf.LogLevelStats}})
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
