package ebpfmon_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"testing"
	"time"

	"github.com/awnumar/memguard"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/keygate/keygate/ebpfmon"
	"github.com/keygate/keygate/internal/testutil"
	"github.com/keygate/keygate/keymem"
)

// TestBenignWorkload runs what a busy machine does around a key holder (ps,
// top-style reads of every /proc/<pid>/stat and status, a build, processes
// reading their own memory) and expects zero events on the default stream
// (MinSeverity warning). ps (procps-ng 4) reads /proc/<pid>/environ of every
// process, and the workload reads the victim's environ itself: those are
// info events, which must be counted (Stats, metrics) and not delivered.
func TestBenignWorkload(t *testing.T) {
	m := startMonitor(t, ebpfmon.Config{})
	v := startVictim(t)
	if err := m.Protect(v.PID, []ebpfmon.Range{v.Key}); err != nil {
		t.Fatal(err)
	}
	pid := strconv.Itoa(v.PID)
	runAttack(t, "benign_proc", pid)
	runAttack(t, "vm_readv_self", pid)
	runAttack(t, "environ", pid)
	for _, args := range [][]string{
		{testutil.LookPath(t, "ps"), "aux"},
		{testutil.LookPath(t, "ps"), "-o", "pid,stat,rss,cmd", "-p", pid},
		{testutil.LookPath(t, "top"), "-b", "-n", "1"},
		{testutil.LookPath(t, "pgrep"), "-f", "ebpfmon"},
	} {
		if out, err := exec.Command(args[0], args[1:]...).CombinedOutput(); err != nil && args[0] != "pgrep" {
			t.Fatalf("%v: %v: %s", args, err, out)
		}
	}
	// A build: go compiles and links a small program.
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "go.mod"), []byte("module benign\n\ngo 1.22\n"), 0o644)
	os.WriteFile(filepath.Join(dir, "main.go"), []byte("package main\n\nimport \"fmt\"\n\nfunc main() { fmt.Println(\"hi\") }\n"), 0o644)
	build := exec.Command(testutil.LookPath(t, "go"), "build", "-o", "prog", ".")
	build.Dir = dir
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v: %s", err, out)
	}
	// The marker, a warning (a read away from the key that fails: one that
	// succeeds is critical in detect mode): everything the workload caused
	// came before it.
	a := runAttack(t, "vm_readv_fault", pid, fmt.Sprintf("%#x", v.Other))
	before, marker := eventsUntil(t, m, a.PID)
	for _, e := range before {
		if e.Technique == ebpfmon.BPFProgLoad {
			// Reported whoever loads a program: the workload above loads
			// none, other tests starting monitors beside this one do.
			t.Logf("a BPF program load elsewhere on the machine: %v (exe %s)", e, e.Exe)
			continue
		}
		t.Errorf("event on the default stream from a benign workload: %v (exe %s)", e, e.Exe)
	}
	if marker.Technique != ebpfmon.ProcessVMReadv || marker.Severity != ebpfmon.Warning {
		t.Errorf("marker event %v, want a process_vm_readv warning", marker)
	}
	st, err := m.Stats()
	if err != nil {
		t.Fatal(err)
	}
	if n := st.Events[ebpfmon.ProcEnviron][ebpfmon.Info]; n == 0 || st.Below < n {
		t.Errorf("stats %+v: want the environ reads counted as info, below the minimum severity", st)
	}
	t.Logf("counted, not delivered: %d events (%v)", st.Below, st.Events)
	// The metrics are the monitor's counts, the undelivered included.
	reg := prometheus.NewRegistry()
	if _, err := ebpfmon.NewMetrics(reg, m); err != nil {
		t.Fatal(err)
	}
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]float64{}
	for _, mf := range mfs {
		for _, mt := range mf.GetMetric() {
			key := mf.GetName()
			for _, l := range mt.GetLabel() {
				key += "/" + l.GetValue()
			}
			got[key] = mt.GetCounter().GetValue()
		}
	}
	if n := got["keygate_monitor_events_total/info/proc_environ"]; n != float64(st.Events[ebpfmon.ProcEnviron][ebpfmon.Info]) {
		t.Errorf("metrics count %v environ info events, Stats %d", n, st.Events[ebpfmon.ProcEnviron][ebpfmon.Info])
	}
	for _, name := range []string{"keygate_monitor_drops_total", "keygate_monitor_read_errors_total", "keygate_monitor_decode_errors_total"} {
		if v, ok := got[name]; !ok || v != 0 {
			t.Errorf("%s = %v (present %v), want an exported 0", name, v, ok)
		}
	}
}

// TestSelfProtection checks that the monitor's own process is protected and
// follows the key registry: a read over a registered key buffer is critical,
// and once the buffer is unregistered the same read no longer overlaps key
// pages (a warning by its ranges; one that fails is, since a read that
// succeeds is critical in detect mode whatever its ranges).
func TestSelfProtection(t *testing.T) {
	reg := &keymem.Registry{}
	m := startMonitor(t, ebpfmon.Config{Self: reg})
	buf := memguard.NewBufferRandom(32)
	defer buf.Destroy()
	addr := fmt.Sprintf("%#x", uintptrOf(buf.Bytes()))
	self := strconv.Itoa(os.Getpid())

	remove := reg.Add(buf.Bytes())
	a := runAttack(t, "vm_readv", self, addr)
	e := waitEvent(t, m, a.PID, func(e ebpfmon.Event) bool { return e.Technique == ebpfmon.ProcessVMReadv })
	if e.TargetPID != os.Getpid() || !e.Overlap || e.Severity != ebpfmon.Critical {
		t.Errorf("read over a registered key: %+v, want critical overlap on pid %d", e, os.Getpid())
	}
	remove()
	remove() // twice is harmless
	a = runAttack(t, "vm_readv_fault", self, addr)
	e = waitEvent(t, m, a.PID, func(e ebpfmon.Event) bool { return e.Technique == ebpfmon.ProcessVMReadv })
	if e.Overlap || e.Severity != ebpfmon.Warning || e.Result >= 0 {
		t.Errorf("failed read after the key was unregistered: %+v, want a warning without overlap", e)
	}
	a = runAttack(t, "ptrace_seize", self)
	waitEvent(t, m, a.PID, func(e ebpfmon.Event) bool {
		return e.Technique == ebpfmon.PtraceSeize && e.Severity == ebpfmon.Critical
	})
}

// TestUnprotect checks that an unprotected process is no longer watched, and
// that a process's ranges can be replaced.
func TestUnprotect(t *testing.T) {
	m := startMonitor(t, ebpfmon.Config{})
	v := startVictim(t)
	w := startVictim(t)
	for _, p := range []int{v.PID, w.PID} {
		if err := m.Protect(p, nil); err != nil {
			t.Fatal(err)
		}
	}
	a := runAttack(t, "vm_readv", strconv.Itoa(v.PID), fmt.Sprintf("%#x", v.Other))
	e := waitEvent(t, m, a.PID, func(ebpfmon.Event) bool { return true })
	if !e.Overlap || e.Severity != ebpfmon.Critical {
		t.Errorf("whole address space protected, yet %+v", e)
	}
	if err := m.Protect(v.PID, []ebpfmon.Range{v.Key}); err != nil {
		t.Fatal(err)
	}
	a = runAttack(t, "vm_readv", strconv.Itoa(v.PID), fmt.Sprintf("%#x", v.Other))
	if e := waitEvent(t, m, a.PID, func(ebpfmon.Event) bool { return true }); e.Overlap {
		t.Errorf("after narrowing to the key pages, a read elsewhere still overlaps: %+v", e)
	}
	if err := m.Unprotect(v.PID); err != nil {
		t.Fatal(err)
	}
	// The unprotected victim first, then the protected one as a marker.
	runAttack(t, "mem", strconv.Itoa(v.PID))
	runAttack(t, "mem_task", strconv.Itoa(v.PID), "0", strconv.Itoa(v.Thread(t)))
	a = runAttack(t, "mem", strconv.Itoa(w.PID))
	before, marker := eventsUntil(t, m, a.PID)
	for _, e := range before {
		if e.TargetPID == v.PID {
			t.Errorf("event for an unprotected pid: %v", e)
		}
	}
	if marker.TargetPID != w.PID {
		t.Errorf("marker %v, want target %d", marker, w.PID)
	}
}

func TestProtectErrors(t *testing.T) {
	m := startMonitor(t, ebpfmon.Config{})
	gone := exec.Command("true")
	if err := gone.Run(); err != nil {
		t.Fatal(err)
	}
	for _, pid := range []int{0, -1, gone.Process.Pid} {
		if err := m.Protect(pid, nil); err == nil {
			t.Errorf("Protect(%d) succeeded", pid)
		}
	}
	if err := m.Unprotect(gone.Process.Pid); err != nil {
		t.Errorf("Unprotect of a pid never protected: %v", err)
	}
}

// TestMode checks that the mode reported is the mode in force: deny only
// where the BPF LSM is active and the programs attached, and then attacks
// fail; detect otherwise, with the reason, and then attacks go through.
func TestMode(t *testing.T) {
	m := startMonitor(t, ebpfmon.Config{})
	v := startVictim(t)
	if err := m.Protect(v.PID, nil); err != nil {
		t.Fatal(err)
	}
	mode, why := m.Mode()
	t.Logf("mode %s: %s", mode, why)
	if why == "" {
		t.Error("no reason given for the mode")
	}
	lsms, err := ebpfmon.ActiveLSMs()
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Contains(lsms, "bpf") && mode != ebpfmon.ModeDetect {
		t.Fatalf("mode %s although the BPF LSM is not active (%v)", mode, lsms)
	}
	a := runAttack(t, "ptrace_seize", strconv.Itoa(v.PID))
	e := waitEvent(t, m, a.PID, func(e ebpfmon.Event) bool { return e.Technique == ebpfmon.PtraceSeize })
	if e.Mode != mode {
		t.Errorf("event mode %s, monitor mode %s", e.Mode, mode)
	}
	switch mode {
	case ebpfmon.ModeDeny:
		if e.Result != -1 || !e.Denied || a.Err == "" {
			t.Errorf("deny mode, yet the seize went through: %+v (attacker: %q)", e, a.Err)
		}
	case ebpfmon.ModeDetect:
		if e.Result != 0 || e.Denied {
			t.Errorf("detect mode, yet the seize failed: %+v (attacker: %q)", e, a.Err)
		}
	default:
		t.Errorf("mode %q", mode)
	}

	// Asking for detect-only mode gives it, with the reason.
	m2, err := ebpfmon.Start(context.Background(), ebpfmon.Config{DetectOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer m2.Close()
	if mode, why := m2.Mode(); mode != ebpfmon.ModeDetect || why == "" {
		t.Errorf("DetectOnly gave mode %s (%q)", mode, why)
	}
}

// TestDetectNeverDenied checks that no event claims a refusal where no LSM
// program runs, whether the attempt succeeded or failed (kcore and /dev/mem
// fail on kernels without them). TestDenied covers EPERM and EACCES results
// without the LSM's record.
func TestDetectNeverDenied(t *testing.T) {
	m := startMonitor(t, ebpfmon.Config{DetectOnly: true})
	if mode, why := m.Mode(); mode != ebpfmon.ModeDetect {
		t.Fatalf("DetectOnly gave mode %s (%s)", mode, why)
	}
	v := startVictim(t)
	if err := m.Protect(v.PID, nil); err != nil {
		t.Fatal(err)
	}
	pid := strconv.Itoa(v.PID)
	for _, tc := range []struct {
		attack    string
		technique ebpfmon.Technique
	}{
		{"vm_readv", ebpfmon.ProcessVMReadv},
		{"ptrace_attach", ebpfmon.PtraceAttach},
		{"mem", ebpfmon.ProcMem},
		{"pidfd_getfd", ebpfmon.PidfdGetfd},
		{"kcore", ebpfmon.Kcore},
		{"devmem", ebpfmon.DevMem},
	} {
		t.Run(tc.attack, func(t *testing.T) {
			a := runAttack(t, tc.attack, pid, fmt.Sprintf("%#x", v.Key.Start))
			e := waitEvent(t, m, a.PID, func(e ebpfmon.Event) bool { return e.Technique == tc.technique })
			t.Logf("result %d (attacker: %q)", e.Result, a.Err)
			if e.Denied {
				t.Errorf("detect mode, yet denied: %+v", e)
			}
		})
	}
}

func TestNotSupportedError(t *testing.T) {
	err := fmt.Errorf("start: %w", &ebpfmon.NotSupportedError{Feature: "BPF LSM", Reason: "add bpf to lsm="})
	if !errors.Is(err, ebpfmon.ErrNotSupported) {
		t.Error("NotSupportedError does not match ErrNotSupported")
	}
}

// TestCloseLeavesNothing checks that Close releases every file descriptor
// Start took (programs, maps, links, the ring buffer).
func TestCloseLeavesNothing(t *testing.T) {
	testutil.Root(t)
	count := func() int {
		ents, err := os.ReadDir("/proc/self/fd")
		if err != nil {
			t.Fatal(err)
		}
		return len(ents)
	}
	before := count()
	m, err := ebpfmon.Start(context.Background(), ebpfmon.Config{})
	if err != nil {
		testutil.Skip(t, "bpf", err.Error())
	}
	if during := count(); during <= before {
		t.Fatalf("%d fds while running, %d before: the count cannot see BPF objects", during, before)
	}
	if err := m.Close(); err != nil {
		t.Fatal(err)
	}
	if err := m.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	if _, ok := <-m.Events(); ok {
		t.Error("Events still open after Close")
	}
	if after := count(); after != before {
		t.Errorf("%d fds after Close, %d before", after, before)
	}
}

// TestContextEndsMonitor checks that cancelling Start's context closes the
// monitor without a call to Close: Events closes, with no error, and every
// file descriptor Start took (programs, maps, links, the ring buffer) is
// released.
func TestContextEndsMonitor(t *testing.T) {
	testutil.Root(t)
	before := fdCount(t)
	ctx, cancel := context.WithCancel(context.Background())
	m, err := ebpfmon.Start(ctx, ebpfmon.Config{})
	if err != nil {
		testutil.Skip(t, "bpf", err.Error())
	}
	if fdCount(t) <= before {
		t.Fatal("no fds taken while running: the check below could not see a leak")
	}
	cancel()
	closed := make(chan struct{})
	go func() {
		for range m.Events() {
		}
		close(closed)
	}()
	select {
	case <-closed:
	case <-time.After(30 * time.Second):
		m.Close()
		t.Fatal("Events still open 30 s after the context ended")
	}
	if err := m.Err(); err != nil {
		t.Errorf("Err after the context ended: %v, want nil", err)
	}
	// Close runs on its own goroutine once the context ends; the fds go
	// when it is done.
	deadline := time.Now().Add(30 * time.Second)
	for fdCount(t) != before {
		if time.Now().After(deadline) {
			t.Fatalf("%d fds 30 s after the context ended, %d before Start", fdCount(t), before)
		}
		time.Sleep(10 * time.Millisecond)
	}
	if err := m.Close(); err != nil {
		t.Errorf("Close after the context closed the monitor: %v", err)
	}
}

func fdCount(t testing.TB) int {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}
