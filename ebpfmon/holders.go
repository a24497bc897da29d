package ebpfmon

import (
	"bufio"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"
)

// The monitor's maps exist from the moment it loads them, before its
// programs run and before it has recorded their IDs in own: a process
// watching for new maps can take a descriptor of prot in that window,
// unreported, and edit it later to blind the monitor. So once the monitor
// watches (bpf_exit reports every later descriptor), Start looks through
// every other process's descriptors for one of its objects.

// ownFdinfo are the fdinfo lines ("map_id:\t12") naming the monitor's
// objects, as registerOwn recorded them.
func ownFdinfo(cmd uint64, id uint32) string {
	switch cmd {
	case bpfMapGetFDByID:
		return "map_id:\t" + strconv.FormatUint(uint64(id), 10)
	case bpfProgGetFDByID:
		return "prog_id:\t" + strconv.FormatUint(uint64(id), 10)
	default:
		return "link_id:\t" + strconv.FormatUint(uint64(id), 10)
	}
}

const (
	bpfProgGetFDByID = 13
	bpfMapGetFDByID  = 14
	bpfLinkGetFDByID = 30
)

// holders lists the other processes that hold a descriptor of one of the
// monitor's objects, as "pid N (comm): fd F, map_id 12".
func (m *Monitor) holders() []string {
	self := os.Getpid()
	var out []string
	procs, _ := os.ReadDir("/proc")
	for _, p := range procs {
		pid, err := strconv.Atoi(p.Name())
		if err != nil || pid == self {
			continue
		}
		dir := filepath.Join("/proc", p.Name())
		fds, _ := os.ReadDir(filepath.Join(dir, "fd"))
		for _, fd := range fds {
			target, err := os.Readlink(filepath.Join(dir, "fd", fd.Name()))
			if err != nil || !strings.HasPrefix(target, "anon_inode:bpf") {
				continue
			}
			if what := m.ownObject(filepath.Join(dir, "fdinfo", fd.Name())); what != "" {
				comm, _ := os.ReadFile(filepath.Join(dir, "comm"))
				out = append(out, fmt.Sprintf("pid %d (%s): fd %s, %s", pid, strings.TrimSpace(string(comm)), fd.Name(), what))
			}
		}
	}
	return out
}

// ownObject returns the fdinfo line of a descriptor that names one of the
// monitor's objects, or "".
func (m *Monitor) ownObject(fdinfo string) string {
	f, err := os.Open(fdinfo)
	if err != nil {
		return ""
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if m.ownLines[sc.Text()] {
			return strings.Replace(sc.Text(), ":\t", " ", 1)
		}
	}
	return ""
}

// checkHolders fails when another process holds a descriptor of the
// monitor's objects, or when the maps hold what the monitor did not put
// there (a descriptor taken, used and closed in the window: prot naming
// the attacker would exempt it from every report, allow would let it
// through the BPF LSM). A holder that lets go within a moment (bpftool
// listing every map) is let be.
func (m *Monitor) checkHolders(allow []int) error {
	self := uint32(os.Getpid())
	var k, v uint32
	for it := m.objs.Prot.Iterate(); it.Next(&k, new(monitorProtectedProc)); {
		if k != self {
			return fmt.Errorf("the monitor's map of protected processes names pid %d, which the monitor did not put there: another process edited it as the monitor loaded (find out which, and start again)", k)
		}
	}
	for it := m.objs.Targets.Iterate(); it.Next(&k, &v); {
		if v != self {
			return fmt.Errorf("the monitor's map of protected threads maps %d to %d, which the monitor did not put there: another process edited it as the monitor loaded (find out which, and start again)", k, v)
		}
	}
	var one uint8
	for it := m.objs.Allow.Iterate(); it.Next(&k, &one); {
		if !slices.Contains(allow, int(k)) {
			return fmt.Errorf("the monitor's allowlist names pid %d, which Config.Allow does not: another process edited it as the monitor loaded (find out which, and start again)", k)
		}
	}
	h := m.holders()
	if len(h) == 0 {
		return nil
	}
	time.Sleep(200 * time.Millisecond)
	if h = m.holders(); len(h) == 0 {
		return nil
	}
	return fmt.Errorf("another process took a descriptor of the monitor's BPF objects as they were loaded, before the monitor could watch for it; "+
		"with a map's it can switch the monitor off unseen: %s (find out why it tracks new BPF maps, stop it, and start again)", strings.Join(h, "; "))
}
