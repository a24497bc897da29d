package ebpfmon_test

import (
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/keygate/keygate/ebpfmon"
)

// TestTechniques carries out every technique against a victim holding a key
// in memguard and checks the alert the monitor raises, field by field.
func TestTechniques(t *testing.T) {
	// Info too: environ and maps are among the techniques checked.
	m := startMonitor(t, ebpfmon.Config{MinSeverity: ebpfmon.Info})
	v := startVictim(t)
	if err := m.Protect(v.PID, []ebpfmon.Range{v.Key}); err != nil {
		t.Fatal(err)
	}
	tid := v.Thread(t)
	key := fmt.Sprintf("%#x", v.Key.Start)
	other := fmt.Sprintf("%#x", v.Other)
	pid := strconv.Itoa(v.PID)
	exe, _ := os.Executable()

	tests := []struct {
		name      string
		args      []string
		technique ebpfmon.Technique
		severity  ebpfmon.Severity
		overlap   bool
		target    int    // the pid as named, when it is not the victim's
		path      string // expected path, when the syscall takes one
		wantErr   bool   // the syscall fails here (no /proc/kcore, /dev/mem on this kernel) yet is flagged
		via       string // the open's route, for opens
		arg       uint64 // open flags, when not O_RDONLY|O_CLOEXEC
		scope     string // perf_event_open without a target
	}{
		{name: "process_vm_readv over the key", args: []string{"vm_readv", pid, key}, technique: ebpfmon.ProcessVMReadv, severity: ebpfmon.Critical, overlap: true},
		// Detect mode: a read that succeeds is critical whatever its ranges
		// (TestReadvSwappedMidCall); the victim is dumpable and the attacker
		// root, so it succeeds. One that fails is judged by its ranges.
		{name: "process_vm_readv elsewhere", args: []string{"vm_readv", pid, other}, technique: ebpfmon.ProcessVMReadv, severity: ebpfmon.Critical},
		{name: "process_vm_readv elsewhere, failing", args: []string{"vm_readv_fault", pid, other}, technique: ebpfmon.ProcessVMReadv, severity: ebpfmon.Warning, wantErr: true},
		{name: "process_vm_readv through a thread id", args: []string{"vm_readv", strconv.Itoa(tid), key}, technique: ebpfmon.ProcessVMReadv, severity: ebpfmon.Critical, overlap: true, target: tid},
		{name: "process_vm_writev", args: []string{"vm_writev", pid, other}, technique: ebpfmon.ProcessVMWritev, severity: ebpfmon.Critical},
		{name: "ptrace attach", args: []string{"ptrace_attach", pid}, technique: ebpfmon.PtraceAttach, severity: ebpfmon.Critical},
		{name: "ptrace seize", args: []string{"ptrace_seize", pid}, technique: ebpfmon.PtraceSeize, severity: ebpfmon.Critical},
		{name: "ptrace peek at the key", args: []string{"ptrace_peek", pid, key}, technique: ebpfmon.PtracePeek, severity: ebpfmon.Critical, overlap: true},
		{name: "ptrace poke elsewhere", args: []string{"ptrace_poke", pid, other}, technique: ebpfmon.PtracePoke, severity: ebpfmon.Warning},
		{name: "proc mem absolute", args: []string{"mem", pid}, technique: ebpfmon.ProcMem, severity: ebpfmon.Critical, overlap: true, path: "/proc/" + pid + "/mem"},
		{name: "proc mem task", args: []string{"mem_task", pid, "0", strconv.Itoa(tid)}, technique: ebpfmon.ProcMem, severity: ebpfmon.Critical, overlap: true,
			path: fmt.Sprintf("/proc/%s/task/%d/mem", pid, tid)},
		{name: "proc mem through /proc/self/..", args: []string{"mem_self_relative", pid}, technique: ebpfmon.ProcMem, severity: ebpfmon.Critical, overlap: true,
			path: "/proc/self/../" + pid + "/mem"},
		{name: "proc mem dirfd-relative", args: []string{"mem_dirfd", pid}, technique: ebpfmon.ProcMem, severity: ebpfmon.Critical, overlap: true, path: "mem"},
		{name: "proc mem task dirfd-relative", args: []string{"mem_task_dirfd", pid, "0", strconv.Itoa(tid)}, technique: ebpfmon.ProcMem, severity: ebpfmon.Critical, overlap: true, path: "mem"},
		{name: "proc mem cwd-relative", args: []string{"mem_cwd", pid}, technique: ebpfmon.ProcMem, severity: ebpfmon.Critical, overlap: true, path: "mem"},
		{name: "proc mem openat2", args: []string{"mem_openat2", pid}, technique: ebpfmon.ProcMem, severity: ebpfmon.Critical, overlap: true, path: "/proc/" + pid + "/mem"},
		{name: "proc mem open(2)", args: []string{"mem_open", pid}, technique: ebpfmon.ProcMem, severity: ebpfmon.Critical, overlap: true, path: "/proc/" + pid + "/mem", via: "open"},
		{name: "proc mem creat(2)", args: []string{"mem_creat", pid}, technique: ebpfmon.ProcMem, severity: ebpfmon.Critical, overlap: true, path: "/proc/" + pid + "/mem", via: "creat",
			arg: unix.O_CREAT | unix.O_WRONLY | unix.O_TRUNC},
		{name: "proc mem io_uring openat", args: []string{"mem_io_uring", pid}, technique: ebpfmon.ProcMem, severity: ebpfmon.Critical, overlap: true, via: "io_uring"},
		{name: "proc kcore open(2)", args: []string{"kcore_open", pid}, technique: ebpfmon.Kcore, severity: ebpfmon.Critical, overlap: true, path: "/proc/kcore", target: -1, via: "open"},
		{name: "process_vm_readv, remote iovec not yet faulted in", args: []string{"vm_readv_lazy", pid, key}, technique: ebpfmon.ProcessVMReadv, severity: ebpfmon.Critical, overlap: true},
		{name: "perf_event_open on a CPU (pid -1)", args: []string{"perf_cpu", pid}, technique: ebpfmon.PerfEventOpen, severity: ebpfmon.Warning, target: -1, scope: "cpu"},
		{name: "perf_event_open on a cgroup", args: []string{"perf_cgroup", pid}, technique: ebpfmon.PerfEventOpen, severity: ebpfmon.Warning, target: -1, scope: "cgroup"},
		{name: "proc environ", args: []string{"environ", pid}, technique: ebpfmon.ProcEnviron, severity: ebpfmon.Info, path: "/proc/" + pid + "/environ"},
		{name: "proc maps", args: []string{"maps", pid}, technique: ebpfmon.ProcMaps, severity: ebpfmon.Info, path: "/proc/" + pid + "/maps"},
		{name: "pidfd_getfd", args: []string{"pidfd_getfd", pid}, technique: ebpfmon.PidfdGetfd, severity: ebpfmon.Critical},
		{name: "perf_event_open", args: []string{"perf_event_open", pid}, technique: ebpfmon.PerfEventOpen, severity: ebpfmon.Warning},
		{name: "proc kcore", args: []string{"kcore", pid}, technique: ebpfmon.Kcore, severity: ebpfmon.Critical, overlap: true, path: "/proc/kcore", target: -1},
		{name: "dev mem", args: []string{"devmem", pid}, technique: ebpfmon.DevMem, severity: ebpfmon.Critical, overlap: true, path: "/dev/mem", target: -1},
	}
	var latencies []time.Duration
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			a := runAttack(t, tc.args[0], tc.args[1:]...)
			e := waitEvent(t, m, a.PID, func(e ebpfmon.Event) bool { return e.Technique == tc.technique })
			latencies = append(latencies, time.Duration(e.ReceivedNS-a.Start))
			wantTarget, wantPID := v.PID, v.PID
			switch {
			case tc.target == -1:
				wantTarget, wantPID = 0, 0
			case tc.target != 0:
				wantTarget = tc.target
			}
			if e.Severity != tc.severity || e.Overlap != tc.overlap || e.Target != wantTarget || e.TargetPID != wantPID {
				t.Errorf("event %+v:\nwant severity %s overlap %v target %d target_pid %d", e, tc.severity, tc.overlap, wantTarget, wantPID)
			}
			if e.PID == 0 || e.Comm == "" || e.UID != os.Geteuid() || e.CgroupID == 0 || e.Mode == "" {
				t.Errorf("accessor fields missing: %+v", e)
			}
			if e.Exe != exe && !strings.HasSuffix(exe, e.Exe) {
				t.Errorf("exe %q, want %q", e.Exe, exe)
			}
			if e.KernelNS < a.Start {
				t.Errorf("event at %d, before the attack began at %d", e.KernelNS, a.Start)
			}
			if tc.path != "" && e.Path != tc.path {
				t.Errorf("path %q, want %q", e.Path, tc.path)
			}
			// Every attacking open (openat and openat2 alike) passes these
			// flags, but creat.
			wantArg := uint64(unix.O_RDONLY | unix.O_CLOEXEC)
			if tc.arg != 0 {
				wantArg = tc.arg
			}
			if tc.path != "" && e.Arg != wantArg {
				t.Errorf("open flags %#x, want %#x", e.Arg, wantArg)
			}
			if tc.via != "" && e.Via != tc.via {
				t.Errorf("via %q, want %q", e.Via, tc.via)
			}
			if e.Scope != tc.scope {
				t.Errorf("scope %q, want %q", e.Scope, tc.scope)
			}
			if tc.overlap && !strings.HasPrefix(tc.args[0], "mem") && tc.technique != ebpfmon.Kcore && tc.technique != ebpfmon.DevMem {
				if e.Addr != v.Key.Start || e.OverlapBytes == 0 {
					t.Errorf("addr %#x overlap %d, want the key at %#x", e.Addr, e.OverlapBytes, v.Key.Start)
				}
			}
			if !tc.overlap && e.Addr != 0 && e.OverlapBytes != 0 {
				t.Errorf("overlap bytes %d for an address away from the key", e.OverlapBytes)
			}
			if failed := a.Err != ""; failed != (e.Result < 0) {
				t.Errorf("attacker's syscall error %q but event result %d", a.Err, e.Result)
			}
			if e.ReceivedNS < e.KernelNS {
				t.Errorf("event received at %d, before the kernel recorded it at %d", e.ReceivedNS, e.KernelNS)
			}
			t.Logf("%s: result %d, attacker error %q, latency %v", e.Technique, e.Result, a.Err, time.Duration(e.ReceivedNS-a.Start))
		})
	}
	st, err := m.Stats()
	if err != nil {
		t.Fatal(err)
	}
	if st.Drops != 0 {
		t.Errorf("%d events dropped", st.Drops)
	}
	slices.Sort(latencies)
	if len(latencies) > 0 {
		t.Logf("alert latency (attack syscall to event in user space): p50 %v max %v", latencies[len(latencies)/2], latencies[len(latencies)-1])
	}
}
