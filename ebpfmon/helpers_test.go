package ebpfmon_test

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"
	"unsafe"

	"github.com/awnumar/memguard"
	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/keygate/keygate/ebpfmon"
	"github.com/keygate/keygate/internal/openroute"
	"github.com/keygate/keygate/internal/testutil"
)

// The test binary doubles as the protected victim and as the attacker:
// TestMain runs the role KEYGATE_EBPFMON_ROLE names instead of the tests.
const roleEnv = "KEYGATE_EBPFMON_ROLE"

func TestMain(m *testing.M) {
	switch os.Getenv(roleEnv) {
	case "victim":
		victim()
	case "attacker":
		os.Exit(attack(os.Args[1:]))
	}
	os.Exit(m.Run())
}

// victim holds a key in a memguard buffer, prints where it is and where a
// heap byte away from it is, and waits for stdin to close.
func victim() {
	key := memguard.NewBufferRandom(64)
	other := make([]byte, 4096)
	other[0] = 1
	b := key.Bytes()
	fmt.Printf("ready %d %#x %#x %#x\n", os.Getpid(), uintptr(unsafe.Pointer(&b[0])), uintptr(unsafe.Pointer(&b[0]))+uintptr(len(b)),
		uintptr(unsafe.Pointer(&other[0])))
	// Keep several threads alive, so that task/<tid>/mem can name one that
	// is not the main thread.
	for i := 0; i < 3; i++ {
		go func() {
			runtime.LockOSThread()
			select {}
		}()
	}
	io.Copy(io.Discard, os.Stdin)
	key.Destroy()
	runtime.KeepAlive(other)
	os.Exit(0)
}

// Victim is a running victim process.
type Victim struct {
	PID   int
	Key   ebpfmon.Range // the memguard buffer holding the key
	Other uint64        // a heap address away from the key pages
	cmd   *exec.Cmd
	stdin io.WriteCloser
}

func startVictim(t testing.TB) *Victim {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), roleEnv+"=victim")
	in, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatalf("start victim: %v", err)
	}
	v := &Victim{cmd: cmd, stdin: in}
	t.Cleanup(func() { v.Stop() })
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil {
		t.Fatalf("victim did not report: %v", err)
	}
	if _, err := fmt.Sscanf(line, "ready %d %v %v %v", &v.PID, &v.Key.Start, &v.Key.End, &v.Other); err != nil {
		t.Fatalf("victim said %q: %v", line, err)
	}
	return v
}

// Stop ends the victim and waits for it.
func (v *Victim) Stop() {
	if v.cmd.ProcessState != nil {
		return
	}
	v.stdin.Close()
	v.cmd.Wait()
}

// Thread returns a thread of the victim other than its main thread.
func (v *Victim) Thread(t testing.TB) int {
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", v.PID))
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		if tid, _ := strconv.Atoi(e.Name()); tid != 0 && tid != v.PID {
			return tid
		}
	}
	t.Fatalf("victim %d has no thread besides its main one", v.PID)
	return 0
}

// attackResult is what an attacker reports: its pid, CLOCK_MONOTONIC just
// before the attacking syscall, and the syscall's error, if any.
type attackResult struct {
	PID   int
	Start uint64
	Err   string
	// ReadNonzero: the attacker said "read N nonzero true" (readvSwapped).
	ReadNonzero bool
	// BSS: the IDs of the maps named .bss the attacker said it took (grabBSS).
	BSS []uint64
}

// runAttack runs the attacker with technique against the victim.
func runAttack(t testing.TB, technique string, args ...string) attackResult {
	t.Helper()
	cmd := exec.Command(os.Args[0], append([]string{technique}, args...)...)
	cmd.Env = append(os.Environ(), roleEnv+"=attacker")
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("attacker %s %v: %v: %s", technique, args, err, out)
	}
	var r attackResult
	for _, l := range strings.Split(string(out), "\n") {
		f := strings.SplitN(l, " ", 2)
		switch f[0] {
		case "pid":
			r.PID, _ = strconv.Atoi(f[1])
		case "start":
			r.Start, _ = strconv.ParseUint(f[1], 10, 64)
		case "err":
			r.Err = f[1]
		case "read":
			r.ReadNonzero = strings.HasSuffix(f[1], "nonzero true")
		case "bss":
			id, _ := strconv.ParseUint(f[1], 10, 64)
			r.BSS = append(r.BSS, id)
		}
	}
	if r.PID == 0 || r.Start == 0 {
		t.Fatalf("attacker %s said %q", technique, out)
	}
	return r
}

// attack carries out one technique: args are the technique, then the
// victim's pid, an address, and (for task forms) a thread id.
func attack(args []string) int {
	runtime.LockOSThread() // ptrace requests must come from the tracing thread
	tech := args[0]
	pid, _ := strconv.Atoi(args[1])
	var addr uint64
	if len(args) > 2 {
		addr, _ = strconv.ParseUint(args[2], 0, 64)
	}
	tid := pid
	if len(args) > 3 {
		tid, _ = strconv.Atoi(args[3])
	}
	fmt.Printf("pid %d\n", os.Getpid())
	start := func() { fmt.Printf("start %d\n", ebpfmon.MonotonicNow()) }
	var err error
	buf := make([]byte, 64)
	open := func(dfd int, path string) {
		start()
		var fd int
		fd, err = unix.Openat(dfd, path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err == nil {
			unix.Close(fd)
		}
	}
	switch tech {
	case "vm_readv":
		start()
		_, err = unix.ProcessVMReadv(pid, []unix.Iovec{{Base: &buf[0], Len: 64}},
			[]unix.RemoteIovec{{Base: uintptr(addr), Len: 64}}, 0)
	case "vm_readv_fault":
		// The local buffer cannot be written: the kernel fails the call (EFAULT)
		// before it reads anything.
		var none []byte
		if none, err = unix.Mmap(-1, 0, os.Getpagesize(), unix.PROT_NONE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS); err != nil {
			break
		}
		start()
		_, err = unix.ProcessVMReadv(pid, []unix.Iovec{{Base: &none[0], Len: 64}},
			[]unix.RemoteIovec{{Base: uintptr(addr), Len: 64}}, 0)
	case "vm_writev":
		start()
		_, err = unix.ProcessVMWritev(pid, []unix.Iovec{{Base: &buf[0], Len: 8}},
			[]unix.RemoteIovec{{Base: uintptr(addr), Len: 8}}, 0)
	case "vm_readv_self":
		mine := make([]byte, 64)
		start()
		_, err = unix.ProcessVMReadv(os.Getpid(), []unix.Iovec{{Base: &buf[0], Len: 64}},
			[]unix.RemoteIovec{{Base: uintptr(unsafe.Pointer(&mine[0])), Len: 64}}, 0)
	case "ptrace_attach", "ptrace_peek", "ptrace_poke":
		if tech == "ptrace_attach" {
			start()
		}
		if err = unix.PtraceAttach(pid); err != nil {
			break
		}
		var ws unix.WaitStatus
		unix.Wait4(pid, &ws, unix.WALL, nil)
		switch tech {
		case "ptrace_peek":
			start()
			_, err = unix.PtracePeekData(pid, uintptr(addr), buf[:8])
		case "ptrace_poke":
			if _, err = unix.PtracePeekData(pid, uintptr(addr), buf[:8]); err == nil {
				start()
				_, err = unix.PtracePokeData(pid, uintptr(addr), buf[:8]) // writes back what was there
			}
		}
		unix.PtraceDetach(pid)
	case "ptrace_seize":
		start()
		err = unix.PtraceSeize(pid)
		// Exiting detaches; a seized tracee never stopped.
	case "mem":
		open(unix.AT_FDCWD, fmt.Sprintf("/proc/%d/mem", pid))
	case "mem_task":
		open(unix.AT_FDCWD, fmt.Sprintf("/proc/%d/task/%d/mem", pid, tid))
	case "mem_self_relative":
		open(unix.AT_FDCWD, fmt.Sprintf("/proc/self/../%d/mem", pid))
	case "mem_dirfd", "mem_task_dirfd":
		dir := fmt.Sprintf("/proc/%d", pid)
		if tech == "mem_task_dirfd" {
			dir = fmt.Sprintf("/proc/%d/task/%d", pid, tid)
		}
		var dfd int
		if dfd, err = unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY, 0); err == nil {
			open(dfd, "mem")
		}
	case "mem_cwd":
		if err = unix.Chdir(fmt.Sprintf("/proc/%d", pid)); err == nil {
			open(unix.AT_FDCWD, "mem")
		}
	case "mem_openat2":
		start()
		var fd int
		fd, err = unix.Openat2(unix.AT_FDCWD, fmt.Sprintf("/proc/%d/mem", pid), &unix.OpenHow{Flags: unix.O_RDONLY | unix.O_CLOEXEC})
		if err == nil {
			unix.Close(fd)
		}
	case "mem_open":
		err = openroute.Legacy(fmt.Sprintf("/proc/%d/mem", pid), false, start)
	case "mem_creat":
		err = openroute.Legacy(fmt.Sprintf("/proc/%d/mem", pid), true, start)
	case "mem_io_uring":
		err = openroute.Ring(fmt.Sprintf("/proc/%d/mem", pid), start)
	case "kcore_open":
		err = openroute.Legacy("/proc/kcore", false, start)
	case "perf_cpu":
		err = perfWide(false, start)
	case "perf_cgroup":
		err = perfWide(true, start)
	case "vm_readv_swapped":
		other, _ := strconv.ParseUint(args[3], 0, 64)
		err = readvSwapped(pid, addr, other, start)
	case "grab_bss":
		err = grabBSS(pid, start)
	case "grab_new_prot":
		err = grabNewProt(pid)
	case "bpf_prog_load":
		err = loadProgram(ebpf.TracePoint, 0, start)
	case "bpf_prog_load_cgroup_skb":
		err = loadProgram(ebpf.CGroupSKB, ebpf.AttachCGroupInetEgress, start)
	case "blind_monitor":
		err = blindMonitor(tid, pid, addr, start) // the fourth argument: the monitor's pid
	case "vm_readv_lazy":
		err = readvLazy(pid, addr, start)
	case "environ":
		open(unix.AT_FDCWD, fmt.Sprintf("/proc/%d/environ", pid))
	case "maps":
		open(unix.AT_FDCWD, fmt.Sprintf("/proc/%d/maps", pid))
	case "pidfd_getfd":
		var pfd int
		if pfd, err = unix.PidfdOpen(pid, 0); err == nil {
			start()
			var fd int
			if fd, err = unix.PidfdGetfd(pfd, 0, 0); err == nil {
				unix.Close(fd)
			}
		}
	case "perf_event_open":
		attr := unix.PerfEventAttr{Type: unix.PERF_TYPE_SOFTWARE, Config: unix.PERF_COUNT_SW_CPU_CLOCK,
			Size: uint32(unsafe.Sizeof(unix.PerfEventAttr{})), Bits: unix.PerfBitDisabled}
		start()
		var fd int
		if fd, err = unix.PerfEventOpen(&attr, pid, -1, -1, unix.PERF_FLAG_FD_CLOEXEC); err == nil {
			unix.Close(fd)
		}
	case "kcore":
		open(unix.AT_FDCWD, "/proc/kcore")
	case "devmem":
		open(unix.AT_FDCWD, "/dev/mem")
	case "benign_proc":
		// What ps and top read, of the victim and of everyone.
		start()
		for _, f := range []string{"stat", "status", "cmdline", "statm"} {
			os.ReadFile(fmt.Sprintf("/proc/%d/%s", pid, f))
		}
		ents, _ := os.ReadDir("/proc")
		for _, e := range ents {
			os.ReadFile(filepath.Join("/proc", e.Name(), "stat"))
		}
		os.ReadFile("/proc/self/maps")
		os.ReadFile("/proc/self/environ")
		os.ReadFile("/proc/self/mem")
	default:
		fmt.Fprintf(os.Stderr, "unknown technique %q\n", tech)
		return 2
	}
	if err != nil {
		fmt.Printf("err %v\n", err)
	}
	return 0
}

// startMonitor starts a monitor for the test, or skips without root.
func startMonitor(t testing.TB, cfg ebpfmon.Config) *ebpfmon.Monitor {
	t.Helper()
	testutil.Root(t)
	m, err := ebpfmon.Start(context.Background(), cfg)
	if err != nil {
		testutil.Skip(t, "bpf", fmt.Sprintf("start the monitor: %v", err))
	}
	t.Cleanup(func() {
		if err := m.Close(); err != nil {
			t.Errorf("close monitor: %v", err)
		}
	})
	return m
}

// waitEvent returns the first event from accessor pid for which match holds,
// failing on any other event whose accessor is pid. The timeout only stops a
// hung test; nothing is asserted about how long the event took.
func waitEvent(t testing.TB, m *ebpfmon.Monitor, pid int, match func(ebpfmon.Event) bool) ebpfmon.Event {
	t.Helper()
	timeout := time.After(30 * time.Second)
	for {
		select {
		case e, ok := <-m.Events():
			if !ok {
				t.Fatal("events channel closed")
			}
			if e.TGID != pid {
				continue
			}
			if match(e) {
				return e
			}
			t.Logf("other event from the attacker: %+v", e)
		case <-timeout:
			t.Fatalf("no matching event from pid %d within 30s", pid)
		}
	}
}

// eventsUntil collects the events that arrive before the first one from
// accessor pid, which it returns too. The kernel's ring buffer keeps the
// order in which events were recorded, so a marker attack made after a
// workload proves that every event of the workload has been seen.
func eventsUntil(t testing.TB, m *ebpfmon.Monitor, pid int) (before []ebpfmon.Event, marker ebpfmon.Event) {
	t.Helper()
	timeout := time.After(30 * time.Second)
	for {
		select {
		case e, ok := <-m.Events():
			if !ok {
				t.Fatal("events channel closed")
			}
			if e.TGID == pid {
				return before, e
			}
			before = append(before, e)
		case <-timeout:
			t.Fatalf("no event from the marker pid %d within 30s", pid)
		}
	}
}

func uintptrOf(b []byte) uintptr { return uintptr(unsafe.Pointer(&b[0])) }
