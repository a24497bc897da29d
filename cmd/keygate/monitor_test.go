package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/keygate/keygate/ebpfmon"
	"github.com/keygate/keygate/internal/testutil"
)

func TestMonitorUsage(t *testing.T) {
	gone := exec.Command("true")
	if err := gone.Run(); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name string
		args []string
		want string
	}{
		{"no pid", []string{"monitor"}, "--pid is required"},
		{"negative pid", []string{"monitor", "--pid", "-3"}, "--pid is required"},
		{"own pid", []string{"monitor", "--pid", strconv.Itoa(os.Getpid())}, "protects itself already"},
		{"pid not running", []string{"monitor", "--pid", strconv.Itoa(gone.Process.Pid)}, "is the process running"},
		{"stray argument", []string{"monitor", "--pid", "1", "extra"}, "unknown command"},
		{"unknown severity", []string{"monitor", "--pid", "1", "--min-severity", "debug"}, "use info, warning or critical"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var stdout, stderr strings.Builder
			code := run(tc.args, strings.NewReader(""), &stdout, &stderr)
			if code == 0 || !strings.Contains(stderr.String(), tc.want) {
				t.Errorf("exit %d, stderr %q; want a failure saying %q", code, stderr.String(), tc.want)
			}
			if stdout.Len() != 0 {
				t.Errorf("stdout %q on failure", stdout.String())
			}
		})
	}
}

// monitorRun is `keygate monitor` running in-process against a target.
type monitorRun struct {
	target *exec.Cmd
	events *bufio.Reader
	stderr *bufio.Reader
	stdin  *io.PipeWriter
	code   chan int
}

func startMonitorCmd(t *testing.T, args ...string) *monitorRun {
	t.Helper()
	testutil.Root(t)
	target := exec.Command("sleep", "600")
	if err := target.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { target.Process.Kill(); target.Wait() })
	outR, outW := io.Pipe()
	errR, errW := io.Pipe()
	inR, inW := io.Pipe()
	r := &monitorRun{target: target, events: bufio.NewReader(outR), stderr: bufio.NewReader(errR), stdin: inW, code: make(chan int, 1)}
	go func() {
		code := run(append([]string{"monitor", "--pid", strconv.Itoa(target.Process.Pid)}, args...), inR, outW, errW)
		outW.Close()
		errW.Close()
		r.code <- code
	}()
	line, err := r.stderr.ReadString('\n')
	if err != nil {
		select {
		case <-r.code:
		case <-time.After(time.Second):
		}
		testutil.Skip(t, "bpf", fmt.Sprintf("keygate monitor did not start: %q", line))
	}
	if !strings.Contains(line, fmt.Sprintf("protecting pid %d; mode ", target.Process.Pid)) {
		t.Fatalf("first stderr line %q does not announce the pid and mode", line)
	}
	go io.Copy(io.Discard, r.stderr)
	return r
}

// next reads the next JSON event.
func (r *monitorRun) next(t *testing.T) ebpfmon.Event {
	t.Helper()
	line, err := r.events.ReadString('\n')
	if err != nil {
		t.Fatalf("read event: %v", err)
	}
	var e ebpfmon.Event
	if err := json.Unmarshal([]byte(line), &e); err != nil {
		t.Fatalf("event line %q: %v", line, err)
	}
	return e
}

// readv has this process read 8 bytes of the target at addr; the address
// need not be mapped: the attempt is what the monitor reports.
func (r *monitorRun) readv(addr uint64) {
	buf := make([]byte, 8)
	unix.ProcessVMReadv(r.target.Process.Pid, []unix.Iovec{{Base: &buf[0], Len: 8}}, []unix.RemoteIovec{{Base: uintptr(addr), Len: 8}}, 0)
}

// stop kills the target and expects the monitor to notice and exit 0.
func (r *monitorRun) stop(t *testing.T) {
	t.Helper()
	r.target.Process.Kill()
	r.target.Wait()
	if code := <-r.code; code != 0 {
		t.Errorf("keygate monitor exited %d after the target exited", code)
	}
}

func TestMonitorCmdRangesFile(t *testing.T) {
	ranges := filepath.Join(t.TempDir(), "ranges")
	if err := os.WriteFile(ranges, []byte("# the key\n10000-12000\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(t.TempDir(), "events.jsonl")
	r := startMonitorCmd(t, "--json", "--ranges", ranges, "--output", out)
	tests := []struct {
		name     string
		addr     uint64
		overlap  bool
		severity ebpfmon.Severity
	}{
		{"inside the key range", 0x11000, true, ebpfmon.Critical},
		{"outside it", 0x20000, false, ebpfmon.Warning},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r.readv(tc.addr)
			e := r.next(t)
			if e.Technique != ebpfmon.ProcessVMReadv || e.TGID != os.Getpid() || e.TargetPID != r.target.Process.Pid ||
				e.Overlap != tc.overlap || e.Severity != tc.severity || e.Addr != tc.addr || e.Result >= 0 {
				t.Errorf("event %+v; want process_vm_readv by %d on %d at %#x, overlap %v, %s, failed (unmapped)",
					e, os.Getpid(), r.target.Process.Pid, tc.addr, tc.overlap, tc.severity)
			}
		})
	}
	r.stop(t)
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	if n := strings.Count(string(b), "\n"); n != len(tests) {
		t.Errorf("--output has %d lines, want %d", n, len(tests))
	}
}

// TestMonitorCmdRangesStdin streams ranges on stdin: until the first range
// arrives the whole address space counts, after it only the range.
func TestMonitorCmdRangesStdin(t *testing.T) {
	r := startMonitorCmd(t, "--json", "--ranges", "-")
	r.readv(0x20000)
	if e := r.next(t); !e.Overlap {
		t.Errorf("before any range, a read was not counted as key pages: %+v", e)
	}
	if _, err := io.WriteString(r.stdin, "+10000-12000\n"); err != nil {
		t.Fatal(err)
	}
	// The update is applied asynchronously; read until it shows.
	for {
		r.readv(0x20000)
		if e := r.next(t); !e.Overlap {
			break
		}
	}
	r.readv(0x10000)
	if e := r.next(t); !e.Overlap {
		t.Errorf("a read of the streamed range was not counted as key pages: %+v", e)
	}
	io.WriteString(r.stdin, "-99000-99001\n") // never added: the monitor stops with an error
	r.stdin.Close()
	if code := <-r.code; code == 0 {
		t.Error("removing a range never added did not fail")
	}
}

func TestMonitorCmdBadRanges(t *testing.T) {
	ranges := filepath.Join(t.TempDir(), "ranges")
	os.WriteFile(ranges, []byte("10000-12000\nnot a range\n"), 0o600)
	testutil.Root(t)
	target := exec.Command("sleep", "600")
	if err := target.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { target.Process.Kill(); target.Wait() }()
	var stdout, stderr strings.Builder
	code := run([]string{"monitor", "--pid", strconv.Itoa(target.Process.Pid), "--ranges", ranges}, strings.NewReader(""), &stdout, &stderr)
	if code == 0 || !strings.Contains(stderr.String(), "line 2") {
		t.Errorf("exit %d, stderr %q; want a failure naming line 2", code, stderr.String())
	}
	code = run([]string{"monitor", "--pid", strconv.Itoa(target.Process.Pid), "--ranges", ranges + ".missing"}, strings.NewReader(""), &stdout, &stderr)
	if code == 0 || !strings.Contains(stderr.String(), "no such file") {
		t.Errorf("exit %d, stderr %q; want a failure about the missing file", code, stderr.String())
	}
}

func TestMonitorCmdText(t *testing.T) {
	r := startMonitorCmd(t)
	r.readv(0x10000)
	line, err := r.events.ReadString('\n')
	if err != nil {
		t.Fatal(err)
	}
	want := fmt.Sprintf("critical process_vm_readv by pid %d", os.Getpid())
	if !strings.Contains(line, want) || !strings.Contains(line, "(key pages)") {
		t.Errorf("line %q, want one saying %q and (key pages)", line, want)
	}
	r.stop(t)
}

// TestMonitorCmdMinSeverity reads the target's environ (an info event, as
// ps does for every process), then reads its memory (critical): by default
// only the second is printed; with --min-severity info both are.
func TestMonitorCmdMinSeverity(t *testing.T) {
	tests := []struct {
		name  string
		args  []string
		first ebpfmon.Technique
	}{
		{"default: warning and above", []string{"--json"}, ebpfmon.ProcessVMReadv},
		{"info", []string{"--json", "--min-severity", "info"}, ebpfmon.ProcEnviron},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r := startMonitorCmd(t, tc.args...)
			if _, err := os.ReadFile(fmt.Sprintf("/proc/%d/environ", r.target.Process.Pid)); err != nil {
				t.Fatal(err)
			}
			r.readv(0x10000)
			if e := r.next(t); e.Technique != tc.first {
				t.Errorf("first event %v, want %s", e, tc.first)
			}
			go io.Copy(io.Discard, r.events) // the monitor must not block on stdout to see the target exit
			r.stop(t)
		})
	}
}
