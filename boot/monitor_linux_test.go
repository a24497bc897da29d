package boot

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"github.com/keygate/keygate/disk/ninep"
	"github.com/keygate/keygate/keysvc/api"

	"golang.org/x/sys/unix"

	"github.com/keygate/keygate/ebpfmon"
	"github.com/keygate/keygate/internal/testutil"
	"github.com/keygate/keygate/keymem"
)

// attackEnv turns the test binary into an attacker: "readv|mem PID ADDR LEN"
// reads LEN bytes at ADDR of PID with process_vm_readv, or through
// /proc/PID/mem; "readv-fault" makes a process_vm_readv that fails.
const attackEnv = "KEYGATE_BOOT_ATTACK"

// attack is the attacker child. What it reads is wiped unseen: the point is
// the attempt, which the monitor must report.
func attack(spec string) int {
	f := strings.Fields(spec)
	if len(f) != 4 {
		fmt.Println("error: bad spec", spec)
		return 2
	}
	pid, _ := strconv.Atoi(f[1])
	addr, _ := strconv.ParseUint(f[2], 0, 64)
	n, _ := strconv.Atoi(f[3])
	buf := make([]byte, n)
	defer clear(buf)
	var err error
	switch f[0] {
	case "readv":
		_, err = unix.ProcessVMReadv(pid, []unix.Iovec{{Base: &buf[0], Len: uint64(n)}}, []unix.RemoteIovec{{Base: uintptr(addr), Len: n}}, 0)
	case "readv-fault":
		// A local buffer that cannot be written: the kernel fails the call
		// (EFAULT) before it reads anything.
		var none []byte
		if none, err = unix.Mmap(-1, 0, os.Getpagesize(), unix.PROT_NONE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS); err == nil {
			_, err = unix.ProcessVMReadv(pid, []unix.Iovec{{Base: &none[0], Len: uint64(n)}}, []unix.RemoteIovec{{Base: uintptr(addr), Len: n}}, 0)
		}
	case "mem":
		var m *os.File
		if m, err = os.Open(fmt.Sprintf("/proc/%d/mem", pid)); err == nil {
			_, err = m.ReadAt(buf, int64(addr))
			m.Close()
		}
	}
	fmt.Println("attempted:", err)
	return 0
}

// runAttack runs one attack on this process from a child and returns the
// child's pid, which the alert must name.
func runAttack(t *testing.T, kind string, addr uint64, n int) int {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), fmt.Sprintf("%s=%s %d %#x %d", attackEnv, kind, os.Getpid(), addr, n))
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("attacker: %v: %s", err, out)
	}
	t.Logf("attacker %d (%s): %s", cmd.Process.Pid, kind, bytes.TrimSpace(out))
	return cmd.Process.Pid
}

// notKey is memory of this process that is no key: a read of it must be
// reported below critical.
var notKey [64]byte

// newRanges is what after has that before had not.
func newRanges(before, after []keymem.Range) []keymem.Range {
	var out []keymem.Range
	for _, r := range after {
		if !slices.Contains(before, r) {
			out = append(out, r)
		}
	}
	return out
}

// TestMonitor boots in this process with the monitor on (simulator TPM,
// keysvc over HTTPS), attacks this process from a child, and checks that
// the alert reaches the console and the key service (GET
// /v1/admin/events), fields included; with --on-alert lock, that the first
// critical alert, and not a warning before it, locks the volume as a revoke
// does.
func TestMonitor(t *testing.T) {
	testutil.Root(t)
	e := startEnv(t)
	type step struct {
		kind      string // attack: readv or mem
		atKey     bool   // at the DEK's pages, or at notKey
		technique ebpfmon.Technique
		severity  ebpfmon.Severity
	}
	tests := []struct {
		name    string
		onAlert AlertAction
		steps   []step
		lockOn  ebpfmon.Technique // "": must stay unlocked
	}{
		{"log", AlertLog, []step{
			{"readv", true, ebpfmon.ProcessVMReadv, ebpfmon.Critical},
			{"mem", true, ebpfmon.ProcMem, ebpfmon.Critical},
		}, ""},
		{"lock", AlertLock, []step{
			// A warning: a read that fails, away from the keys (one that
			// succeeds is critical in detect mode whatever its ranges).
			{"readv-fault", false, ebpfmon.ProcessVMReadv, ebpfmon.Warning},
			{"mem", true, ebpfmon.ProcMem, ebpfmon.Critical},
		}, ebpfmon.ProcMem},
	}
	for i, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			tp := openSim(t)
			vm := "mon" + string(rune('a'+i))
			e.enroll(t, tp, vm, false)
			img := e.volume(t, vm, vm+"-vol")
			before := keymem.Default.Ranges()
			ev := newEvents()
			c := e.cfg(tp, vm, img, ev)
			c.Monitor, c.OnAlert = true, tc.onAlert
			c.Serve9P = socketPath(t)
			b, err := Run(context.Background(), c)
			if err != nil {
				t.Fatalf("run: %v", err)
			}
			defer b.Close()
			mode, why := b.mon.m.Mode()
			msg := ev.wait(t, EventMonitoring).Message
			if !strings.Contains(msg, string(mode)+" mode") || !strings.Contains(msg, why) {
				t.Fatalf("monitor line %q does not say the mode in force (%s: %s)", msg, mode, why)
			}
			if mode == ebpfmon.ModeDetect && !strings.Contains(msg, "not denied") {
				t.Fatalf("detect mode, but the monitor line does not say attempts are not denied: %q", msg)
			}
			t.Logf("%s", msg)
			ev.wait(t, EventServing)
			keys := newRanges(before, keymem.Default.Ranges())
			if len(keys) == 0 {
				t.Fatal("no key pages registered while serving")
			}

			for _, s := range tc.steps {
				addr := keys[0].Start
				if !s.atKey {
					addr = uint64(uintptr(unsafe.Pointer(&notKey)))
				}
				pid := runAttack(t, s.kind, addr, 64)
				a := waitAlert(t, ev, pid, s.technique)
				if a.Severity != s.severity || a.TargetPID != os.Getpid() || a.Overlap != s.atKey || a.Mode != mode {
					t.Fatalf("alert %s: severity %s target %d overlap %v mode %s; want %s, %d, %v, %s", a, a.Severity, a.TargetPID, a.Overlap, a.Mode, s.severity, os.Getpid(), s.atKey, mode)
				}
				rec := e.waitStoredEvent(t, vm, pid, s.technique)
				if rec.Severity != string(s.severity) || rec.Comm != a.Comm || rec.Volume != vm+"-vol" || rec.TargetPID != os.Getpid() ||
					rec.Overlap != s.atKey || rec.Mode != string(mode) || rec.UID == nil || *rec.UID != uint32(a.UID) || rec.Result == nil || *rec.Result != a.Result {
					t.Fatalf("stored event %+v; want severity %s, comm %s, volume %s, target %d, overlap %v, mode %s, uid %d, result %d",
						rec, s.severity, a.Comm, vm+"-vol", os.Getpid(), s.atKey, mode, a.UID, a.Result)
				}
			}

			if tc.lockOn == "" {
				select {
				case <-b.Done():
					t.Fatalf("--on-alert log locked the volume: %v", b.Wait())
				default:
				}
				root, done := p9Client(t, b.Socket())
				if err := ninep.WriteFile(root, "after-alerts", []byte("still serving")); err != nil {
					t.Fatalf("9P after the alerts: %v", err)
				}
				done()
				if err := b.Close(); err != nil {
					t.Fatal(err)
				}
			} else {
				select {
				case <-b.Done():
				case <-time.After(60 * time.Second):
					t.Fatal("no lock within 60s of a critical alert")
				}
				var ae *AlertError
				if err := b.Wait(); !errors.As(err, &ae) || !errors.Is(err, ErrAlert) || ae.Event.Technique != tc.lockOn {
					t.Fatalf("Wait = %v; want the lock on the first critical alert (%s)", err, tc.lockOn)
				}
				if _, err := net.Dial("unix", b.Socket()); err == nil {
					t.Fatal("9P still answers after the lock")
				}
				if err := b.FS().Put("/after", strings.NewReader("x"), 1); err == nil {
					t.Fatal("the filesystem still takes writes after the lock")
				}
			}
			now := keymem.Default.Ranges()
			for _, r := range keys {
				if slices.Contains(now, r) {
					t.Errorf("key range %#x-%#x still registered after the lock", r.Start, r.End)
				}
			}
		})
	}
}

// TestMonitorAlertDuringUnlock: a critical alert that arrives before the
// volume is open (here: while the monitor announces itself, before the key
// service is asked) still locks it under --on-alert lock, as soon as Run is
// done, and still reaches the key service once there is a session.
func TestMonitorAlertDuringUnlock(t *testing.T) {
	testutil.Root(t)
	e := startEnv(t)
	tp := openSim(t)
	e.enroll(t, tp, "early", false)
	img := e.volume(t, "early", "early-vol")
	ev := newEvents()
	attacker := 0
	c := e.cfg(tp, "early", img, ev)
	c.OnEvent = func(x Event) {
		if x.Kind == EventMonitoring {
			attacker = runAttack(t, "mem", 0, 64) // Run waits for this
		}
		ev.on(x)
	}
	c.Monitor, c.OnAlert = true, AlertLock
	b, err := Run(context.Background(), c)
	if err != nil {
		t.Fatalf("run: %v", err)
	}
	defer b.Close()
	select {
	case <-b.Done():
	case <-time.After(60 * time.Second):
		t.Fatal("no lock within 60s of a critical alert during the unlock")
	}
	var ae *AlertError
	if err := b.Wait(); !errors.As(err, &ae) || ae.Event.TGID != attacker || ae.Event.Technique != ebpfmon.ProcMem {
		t.Fatalf("Wait = %v; want the lock on pid %d's proc_mem", err, attacker)
	}
	if rec := e.waitStoredEvent(t, "early", attacker, ebpfmon.ProcMem); rec.Severity != string(ebpfmon.Critical) {
		t.Fatalf("stored event %+v, want critical", rec)
	}
}

// waitAlert returns the alert about pid's technique, failing after a
// generous bound (a hang, not a latency threshold).
func waitAlert(t *testing.T, ev *events, pid int, tech ebpfmon.Technique) *ebpfmon.Event {
	t.Helper()
	timeout := time.After(60 * time.Second)
	for {
		select {
		case e := <-ev.ch:
			if e.Kind == EventAlert && e.Alert.TGID == pid && e.Alert.Technique == tech {
				return e.Alert
			}
		case <-timeout:
			t.Fatalf("no %s alert from pid %d within 60s; saw %v", tech, pid, ev.kinds())
		}
	}
}

// waitStoredEvent polls GET /v1/admin/events until the key service holds
// pid's event of kind tech.
func (e *env) waitStoredEvent(t *testing.T, vm string, pid int, tech ebpfmon.Technique) api.EventRecord {
	t.Helper()
	for deadline := time.Now().Add(60 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		var recs []api.EventRecord
		if err := json.Unmarshal(e.admin(t, "GET", "/v1/admin/events?vm="+vm+"&kind="+string(tech), nil, http.StatusOK), &recs); err != nil {
			t.Fatal(err)
		}
		for _, r := range recs {
			if r.PID == pid {
				return r
			}
		}
	}
	t.Fatalf("the key service has no %s event of pid %d within 60s", tech, pid)
	return api.EventRecord{}
}

// TestKeyPagesRegistered checks that every key buffer of an unlock is in
// the key-page registry a monitor follows, from creation to destruction:
// the UK (tpm.Import, disk.NewKey) and the DEK (the keyslot's output) while
// they exist, the XTS key schedule (DEK halves and round keys) while
// serving; and that after the lock none is left. It needs no monitor and
// no root, only /proc/self/mem to look at what the ranges hold.
func TestKeyPagesRegistered(t *testing.T) {
	e := startEnv(t)
	tp := openSim(t)
	e.enroll(t, tp, "reg", false)
	img, uk := knownVolume(t, e, "reg")
	defer uk.Destroy()
	dek := volumeKey(t, img, uk)
	defer dek.Destroy()
	needles := keyNeedles(dek.Bytes(), nil)
	defer needles.Destroy()
	mem, err := os.Open("/proc/self/mem")
	if err != nil {
		testutil.Skip(t, "procmem", err.Error())
	}
	defer mem.Close()
	// holds reports whether one of rs holds p.
	holds := func(rs []keymem.Range, p []byte) bool {
		for _, r := range rs {
			buf := make([]byte, r.End-r.Start)
			n, _ := mem.ReadAt(buf, int64(r.Start))
			found := bytes.Contains(buf[:n], p)
			clear(buf)
			if found {
				return true
			}
		}
		return false
	}

	before := keymem.Default.Ranges()
	var mu sync.Mutex
	var sawUK, sawDEK bool
	stop := keymem.Default.Watch(func(rs []keymem.Range) {
		added := newRanges(before, rs)
		mu.Lock()
		defer mu.Unlock()
		sawUK = sawUK || holds(added, uk.Bytes())
		sawDEK = sawDEK || holds(added, dek.Bytes())
	})
	b, err := Run(context.Background(), e.cfg(tp, "reg", img, nil))
	stop()
	if err != nil {
		t.Fatalf("run: %v", err)
	}
	defer b.Close()
	mu.Lock()
	if !sawUK || !sawDEK {
		t.Errorf("while unlocking, registered ranges held the UK: %v, the DEK: %v; want both", sawUK, sawDEK)
	}
	mu.Unlock()

	serving := newRanges(before, keymem.Default.Ranges())
	for i := 0; i < len(needles.list); i += 2 { // each needle, then its word-swapped form
		if !holds(serving, needles.list[i].b) && !holds(serving, needles.list[i+1].b) {
			t.Errorf("while serving, no registered range holds %s", needles.list[i].name)
		}
	}
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	if left := newRanges(before, keymem.Default.Ranges()); len(left) != 0 {
		t.Fatalf("after the lock, %d key ranges are still registered: %v", len(left), left)
	}
}

// TestMonitorNeedsRoot: without the privileges BPF needs, --monitor fails
// before any key is released, saying why and what to do. As root the check
// runs in a child that drops to uid 65534.
func TestMonitorNeedsRoot(t *testing.T) {
	want := []string{"--monitor: cannot start the key-page monitor", "not root", "run keygate boot as root", "drop --monitor"}
	check := func(msg string) {
		t.Helper()
		for _, w := range want {
			if !strings.Contains(msg, w) {
				t.Errorf("error %q lacks %q", msg, w)
			}
		}
	}
	if os.Geteuid() != 0 {
		b := &Boot{log: quietLog()}
		if err := b.startMonitor(); err == nil {
			b.stopMonitor()
			t.Fatal("the monitor started without root")
		} else {
			check(err.Error())
		}
		return
	}
	dir, err := os.MkdirTemp("", "kgn")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	bin := filepath.Join(dir, "boot.test")
	src, err := os.ReadFile(os.Args[0])
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(bin, src, 0o755); err != nil {
		t.Fatal(err)
	}
	os.Chmod(dir, 0o755)
	cmd := exec.Command(bin, "-test.run=^$")
	cmd.Env = append(os.Environ(), noRootEnv+"=1")
	cmd.SysProcAttr = &syscallCredential
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("child: %v: %s", err, out)
	}
	check(string(out))
}

// syscallCredential runs a child as nobody, with no supplementary groups.
var syscallCredential = syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}

// noRootEnv makes the test binary try to start the monitor, unprivileged,
// and print the error.
const noRootEnv = "KEYGATE_BOOT_MONITOR_NOROOT"

func monitorNoRoot() int {
	b := &Boot{log: quietLog()}
	err := b.startMonitor()
	if err == nil {
		b.stopMonitor()
		fmt.Println("error: the monitor started without root")
		return 1
	}
	fmt.Println(err)
	return 0
}
