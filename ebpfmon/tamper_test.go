package ebpfmon_test

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"golang.org/x/sys/unix"

	"github.com/keygate/keygate/ebpfmon"
	"github.com/keygate/keygate/internal/testutil"
)

// blindMonitor is the attacker's side of TestMapTamperingFlagged: root takes
// a descriptor of the monitor's `prot` map by its ID (what `bpftool map
// delete name prot key ...` does), deletes the victim's entry, so that no
// program of the monitor recognises the victim any more, and reads the key.
// It reports as the other attacks do (helpers_test.go): "start" before the
// first descriptor it takes. It looks among the maps of process monitor
// only (mapIDsOf).
func blindMonitor(monitor, pid int, addr uint64, start func()) error {
	key := uint32(pid)
	start()
	done := false
	for _, id := range mapIDsOf(monitor) {
		m, err := ebpf.NewMapFromID(id)
		if err != nil {
			continue
		}
		info, err := m.Info()
		if err == nil && info.Name == "prot" && m.KeySize() == 4 {
			buf := make([]byte, m.ValueSize())
			if m.Lookup(&key, &buf) == nil {
				if err := m.Delete(&key); err != nil {
					m.Close()
					return fmt.Errorf("delete pid %d from the monitor's map: %v", pid, err)
				}
				done = true
			}
		}
		m.Close()
		if done {
			break
		}
	}
	if !done {
		return fmt.Errorf("no map of pid %d protects pid %d", monitor, pid)
	}
	// Blind: the read of the key that follows raises nothing now.
	b := make([]byte, 64)
	_, err := unix.ProcessVMReadv(pid, []unix.Iovec{{Base: &b[0], Len: 64}}, []unix.RemoteIovec{{Base: uintptr(addr), Len: 64}}, 0)
	return err
}

// TestMapTamperingFlagged: root can blind the monitor without unloading or
// killing anything, by editing its maps through a descriptor taken by ID,
// and the key service would go on seeing heartbeats. Taking a descriptor of
// any of the monitor's own maps, programs or links from another process is
// therefore a critical event (bpf_fd), raised before the descriptor can be
// used.
func TestMapTamperingFlagged(t *testing.T) {
	// Detect mode: deny mode has no hook for this route yet (docs/monitor.md,
	// What it does not see).
	m := startMonitor(t, ebpfmon.Config{DetectOnly: true})
	v := startVictim(t)
	if err := m.Protect(v.PID, []ebpfmon.Range{v.Key}); err != nil {
		t.Fatal(err)
	}
	atk := runAttack(t, "blind_monitor", strconv.Itoa(v.PID), fmt.Sprintf("%#x", v.Key.Start), strconv.Itoa(os.Getpid()))
	if atk.Err != "" {
		t.Fatalf("the attacker could not carry out the attack: %s", atk.Err)
	}
	// Marker: an attack on this process (protected whole, as the monitor's
	// own), which the attacker did not touch.
	before, _ := eventsUntil(t, m, runAttack(t, "vm_readv", strconv.Itoa(os.Getpid()), "0x1000").PID)
	var got []ebpfmon.Event
	for _, e := range before {
		if e.TGID == atk.PID {
			got = append(got, e)
		}
	}
	if len(got) == 0 {
		t.Fatal("the attacker took the monitor's map by ID, deleted the victim's entry and read the key: no event at all")
	}
	e := got[0]
	if e.Technique != ebpfmon.BPFFD || e.Severity != ebpfmon.Critical {
		t.Fatalf("first event from the attacker %s, want a critical bpf_fd", e)
	}
	if e.TargetPID != os.Getpid() {
		t.Errorf("bpf_fd names target pid %d, want the monitor's %d", e.TargetPID, os.Getpid())
	}
	if cmd, id := e.Arg>>32, e.Arg&0xffffffff; cmd != unix.BPF_MAP_GET_FD_BY_ID || id == 0 {
		t.Errorf("bpf_fd arg %#x: command %d, id %d; want BPF_MAP_GET_FD_BY_ID (%d) and the map's id", e.Arg, cmd, id, unix.BPF_MAP_GET_FD_BY_ID)
	}
	if e.Result < 0 {
		t.Errorf("result %d: the descriptor was handed out", e.Result)
	}
	t.Logf("%s", e)
}

// loadProgram is the attacker's side of TestProgramLoadFlagged: a program
// of type typ that reads 8 bytes of the current task's memory with
// bpf_probe_read_user. Once attached (a tracepoint program anywhere, a
// socket or cgroup program on the key holder's traffic) it runs in
// whatever task reaches its hook, the key holder included, and reads the
// key there by no route the monitor watches.
func loadProgram(typ ebpf.ProgramType, attach ebpf.AttachType, start func()) error {
	start()
	p, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Type:       typ,
		AttachType: attach,
		License:    "GPL",
		Instructions: asm.Instructions{
			asm.Mov.Reg(asm.R1, asm.R10), asm.Add.Imm(asm.R1, -8),
			asm.Mov.Imm(asm.R2, 8), asm.Mov.Imm(asm.R3, 0x1000),
			asm.FnProbeReadUser.Call(),
			asm.Mov.Imm(asm.R0, 1), asm.Return(),
		},
	})
	if err != nil {
		return err
	}
	return p.Close()
}

// TestProgramLoadFlagged: a BPF program can read the key holder's memory
// from inside the kernel whenever the key holder runs into its hook: a
// tracepoint program on a syscall it makes, and as much a cgroup_skb
// program on its cgroup's egress (the kernel gives bpf_probe_read_user to
// every program type whose loader has CAP_PERFMON). No route the monitor
// watches is taken for that read, so the load by another process is
// reported (bpf_prog_load, warning: what the program then reads is not
// seen).
func TestProgramLoadFlagged(t *testing.T) {
	m := startMonitor(t, ebpfmon.Config{DetectOnly: true})
	for _, tc := range []struct {
		attack string
		typ    ebpf.ProgramType
	}{
		{"bpf_prog_load", ebpf.TracePoint},
		{"bpf_prog_load_cgroup_skb", ebpf.CGroupSKB},
	} {
		t.Run(tc.attack, func(t *testing.T) {
			atk := runAttack(t, tc.attack, "0")
			if atk.Err != "" {
				t.Fatalf("the attacker could not load its program: %s", atk.Err)
			}
			before, _ := eventsUntil(t, m, runAttack(t, "vm_readv", strconv.Itoa(os.Getpid()), "0x1000").PID)
			// The loader's feature probes (cilium/ebpf loads small kprobe
			// programs to test the kernel) are loads too, and reported.
			var got, all []ebpfmon.Event
			for _, e := range before {
				if e.TGID != atk.PID {
					continue
				}
				all = append(all, e)
				if e.Arg == uint64(tc.typ) {
					got = append(got, e)
				}
			}
			if len(got) != 1 {
				t.Fatalf("the attacker loaded a %v program reading user memory: %d events of its type, want one bpf_prog_load; all of its events: %v", tc.typ, len(got), all)
			}
			e := got[0]
			if e.Technique != ebpfmon.BPFProgLoad || e.Severity != ebpfmon.Warning || e.Arg != uint64(tc.typ) || e.Result < 0 {
				t.Errorf("event %s (arg %d, result %d), want a warning bpf_prog_load of type %d that succeeded", e, e.Arg, e.Result, tc.typ)
			}
			t.Logf("%s", e)
		})
	}
}

// bpfIDsOf lists the IDs of the BPF objects of kind ("map", "prog") that
// process pid holds descriptors of, from its fdinfo. The attackers here
// take descriptors of the test process's objects only, found this way, so
// as not to set off the monitors that other tests (other packages' too)
// run beside these.
func bpfIDsOf(pid int, kind string) []uint32 {
	var out []uint32
	dir := fmt.Sprintf("/proc/%d/fd", pid)
	fds, _ := os.ReadDir(dir)
	for _, fd := range fds {
		if l, _ := os.Readlink(dir + "/" + fd.Name()); l != "anon_inode:bpf-"+kind {
			continue
		}
		info, _ := os.ReadFile(fmt.Sprintf("/proc/%d/fdinfo/%s", pid, fd.Name()))
		for _, line := range strings.Split(string(info), "\n") {
			if v, ok := strings.CutPrefix(line, kind+"_id:\t"); ok {
				id, _ := strconv.ParseUint(v, 10, 32)
				out = append(out, uint32(id))
			}
		}
	}
	return out
}

// mapIDsOf lists the IDs of the maps process pid holds.
func mapIDsOf(pid int) []ebpf.MapID {
	var out []ebpf.MapID
	for _, id := range bpfIDsOf(pid, "map") {
		out = append(out, ebpf.MapID(id))
	}
	return out
}

// grabNewProt is the attacker's side of TestStartRaceFlagged: it watches
// the BPF maps process pid holds, says "ready", and takes a descriptor of
// the first one named prot that appears (the monitor's, as it loads),
// saying "grabbed ID", and holds it until stdin closes.
func grabNewProt(pid int) error {
	seen := map[ebpf.MapID]bool{}
	for _, id := range mapIDsOf(pid) {
		seen[id] = true // maps of earlier tests, not the next monitor's
	}
	fmt.Println("ready")
	for {
		for _, id := range mapIDsOf(pid) {
			if seen[id] {
				continue
			}
			seen[id] = true
			m, err := ebpf.NewMapFromID(id)
			if err != nil {
				continue
			}
			if info, err := m.Info(); err == nil && info.Name == "prot" {
				fmt.Printf("grabbed %d\n", id)
				io.Copy(io.Discard, os.Stdin)
				m.Close()
				return nil
			}
			m.Close()
		}
	}
}

// TestStartRaceFlagged: the monitor's maps exist from the moment it loads
// them, before its programs run and before it has recorded their IDs, so
// an attacker who watches for a new `prot` map takes a descriptor of it
// then unseen, and can blind the monitor at leisure later. Start must not
// return a monitor that such a descriptor outlived unreported: it looks
// for descriptors of its objects in other processes once it watches, and
// refuses to start (naming the holder) when there is one.
func TestStartRaceFlagged(t *testing.T) {
	testutil.Root(t)
	cmd := exec.Command(os.Args[0], "grab_new_prot", strconv.Itoa(os.Getpid()))
	cmd.Env = append(os.Environ(), roleEnv+"=attacker")
	in, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	outPipe, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { in.Close(); cmd.Wait() })
	out := bufio.NewReader(outPipe)
	line := func() string {
		s, err := out.ReadString('\n')
		if err != nil {
			t.Fatalf("attacker: %v (said %q)", err, s)
		}
		return strings.TrimSpace(s)
	}
	if l := line(); !strings.HasPrefix(l, "pid ") {
		t.Fatalf("attacker said %q", l)
	}
	if l := line(); l != "ready" {
		t.Fatalf("attacker said %q", l)
	}
	m, startErr := ebpfmon.Start(context.Background(), ebpfmon.Config{DetectOnly: true})
	if startErr == nil {
		t.Cleanup(func() { m.Close() })
	}
	grabbed := line()
	t.Logf("attacker %d: %s; Start: %v", cmd.Process.Pid, grabbed, startErr)
	if startErr != nil {
		if !strings.Contains(startErr.Error(), fmt.Sprintf("pid %d", cmd.Process.Pid)) {
			t.Fatalf("Start failed, but not naming the holder, pid %d: %v", cmd.Process.Pid, startErr)
		}
		return
	}
	// The descriptor was taken after Start recorded the IDs: an event.
	e := waitEvent(t, m, cmd.Process.Pid, func(e ebpfmon.Event) bool { return e.Technique == ebpfmon.BPFFD })
	t.Logf("%s", e)
}

// grabBSS takes, and closes at once, a descriptor of every map process
// monitor holds (a name takes a descriptor to read) and says "bss ID" for
// those named .bss:
// the monitor's holds `inflight`, which its syscall exit programs read
// first (zero: nothing to send), so writing 0 there while an attempt is
// in flight hides it, and a read of the key stalled with userfaultfd stays
// in flight for as long as the attacker likes.
func grabBSS(monitor int, start func()) error {
	start()
	// The loader keeps no descriptor of .bss: it is found among the maps
	// of the monitor's programs (a real attacker walks every map ID).
	ids := mapIDsOf(monitor)
	for _, pid := range bpfIDsOf(monitor, "prog") {
		p, err := ebpf.NewProgramFromID(ebpf.ProgramID(pid))
		if err != nil {
			continue
		}
		if info, err := p.Info(); err == nil {
			more, _ := info.MapIDs()
			ids = append(ids, more...)
		}
		p.Close()
	}
	slices.Sort(ids)
	n := 0
	for _, id := range slices.Compact(ids) {
		m, err := ebpf.NewMapFromID(id)
		if err != nil {
			continue
		}
		if info, err := m.Info(); err == nil && strings.HasSuffix(info.Name, ".bss") {
			fmt.Printf("bss %d\n", id)
			n++
		}
		m.Close()
	}
	if n == 0 {
		return fmt.Errorf("no .bss map")
	}
	return nil
}

// TestGlobalsMapFlagged: the monitor's global variables live in maps of
// their own (.bss, .rodata), which the loader does not name among the
// monitor's maps; a descriptor of them is reported like one of prot.
func TestGlobalsMapFlagged(t *testing.T) {
	m := startMonitor(t, ebpfmon.Config{DetectOnly: true})
	atk := runAttack(t, "grab_bss", strconv.Itoa(os.Getpid()))
	if atk.Err != "" {
		t.Fatalf("attacker: %s", atk.Err)
	}
	before, _ := eventsUntil(t, m, runAttack(t, "vm_readv", strconv.Itoa(os.Getpid()), "0x1000").PID)
	if len(atk.BSS) == 0 {
		t.Fatal("the attacker found no .bss map")
	}
	n := 0
	for _, e := range before {
		if e.TGID == atk.PID && e.Technique == ebpfmon.BPFFD && slices.Contains(atk.BSS, e.Arg&0xffffffff) {
			n++
			t.Logf("%s", e)
		}
	}
	if n != 1 {
		t.Fatalf("the attacker took descriptors of the .bss maps %v, among them the monitor's (its inflight counter): %d events for them, want one", atk.BSS, n)
	}
}
