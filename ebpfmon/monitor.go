package ebpfmon

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"reflect"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/btf"
	"github.com/cilium/ebpf/link"
	"github.com/cilium/ebpf/ringbuf"
	"github.com/cilium/ebpf/rlimit"
	"golang.org/x/sys/unix"

	"github.com/keygate/keygate/keymem"
)

// Mode is what the monitor does about an attempt.
type Mode string

const (
	ModeDetect Mode = "detect" // attempts are reported; the kernel's own checks decide
	ModeDeny   Mode = "deny"   // attempts are reported and the BPF LSM refuses them
)

// ErrNotSupported is matched (with errors.Is) by every error about a kernel
// that lacks something the monitor needs; the error is a *NotSupportedError.
var ErrNotSupported = errors.New("not supported by this kernel")

// NotSupportedError names the missing kernel feature and the fix.
type NotSupportedError struct {
	Feature string
	Reason  string
}

func (e *NotSupportedError) Error() string { return e.Feature + " is not available: " + e.Reason }

// Is matches ErrNotSupported.
func (e *NotSupportedError) Is(target error) bool { return target == ErrNotSupported }

// Config says how to start a Monitor.
type Config struct {
	// DetectOnly skips the BPF LSM even where it is active.
	DetectOnly bool
	// Allow lists accessor pids the BPF LSM lets through (tools the key
	// holder runs on purpose). They are still reported.
	Allow []int
	// Self is the registry of this process's key pages (keymem.Default in
	// the key holder). The monitor always protects its own process, since it
	// holds the BPF objects; with Self it follows Self's ranges, and without
	// it treats its whole address space as key pages.
	Self *keymem.Registry
	// MinSeverity is the lowest severity Events delivers (default Warning).
	// Events below it are still counted (Stats, NewMetrics): a benign ps
	// reads every process's environ, and each read is an info event that
	// would otherwise bury the alerts. Info delivers everything.
	MinSeverity Severity
	// EventBuffer is the capacity of the Events channel (default 1024). When
	// the reader falls behind, the kernel's ring buffer fills and its drops
	// are counted (Stats).
	EventBuffer int
}

// Monitor watches the protected processes. Its methods may be called from
// any goroutine.
type Monitor struct {
	objs     monitorObjects
	enforce  *enforceObjects
	links    []link.Link
	progs    map[string]*ebpf.Program
	rd       *ringbuf.Reader
	events   chan Event
	mode     Mode
	reason   string
	bootTime time.Time
	minSev   Severity

	// counts holds, per technique and severity, every event decoded,
	// delivered or not; readErrs and decodeErrs what the reader lost.
	counts     map[countKey]*atomic.Uint64
	readErrs   atomic.Uint64
	decodeErrs atomic.Uint64
	err        atomic.Pointer[error] // why the reader stopped, if it failed
	lastDrops  uint64                // the kernel's drop count at the last EventsLost (the reader's own)
	ownLines   map[string]bool       // fdinfo lines naming the monitor's own objects (holders.go)

	mu        sync.Mutex
	protected map[int]bool
	stopSelf  func()
	selfErr   error

	done      chan struct{}
	wg        sync.WaitGroup
	closeOnce sync.Once
	closeErr  error
}

// monitorSpec returns the monitor's programs, told whether the kernel has
// the bpf_rdonly_cast kfunc (Linux 6.2+). With it, the open filter reads
// files through inlined loads; without it (Debian 12's 6.1), through
// bpf_probe_read_kernel, and the kfunc's calls are dead code the verifier
// drops. The programs cannot test for it themselves: kernels before 6.4
// refuse the ld_imm64 that bpf_ksym_exists compiles to.
func monitorSpec() (*ebpf.CollectionSpec, error) {
	spec, err := loadMonitor()
	if err != nil {
		return nil, fmt.Errorf("load the embedded BPF object: %w", err)
	}
	if err := spec.Variables[monitorVarHaveRdonlyCast].Set(hasKfunc("bpf_rdonly_cast")); err != nil {
		return nil, fmt.Errorf("set have_rdonly_cast in the BPF object: %w", err)
	}
	return spec, nil
}

// hasKfunc reports whether the running kernel's BTF names the function;
// without kernel BTF the programs do not load anyway, so false is safe.
func hasKfunc(name string) bool {
	k, err := btf.LoadKernelSpec()
	if err != nil {
		return false
	}
	var fn *btf.Func
	return k.TypeByName(name, &fn) == nil
}

// Start loads the BPF programs, attaches them, protects this process and
// starts delivering events. The monitor runs until Close or until ctx ends.
// It needs root (CAP_BPF and CAP_PERFMON) and syscall tracepoints; deny mode
// further needs the BPF LSM, and Mode says which mode is in force and why.
func Start(ctx context.Context, cfg Config) (*Monitor, error) {
	if err := ensureTracefs(); err != nil {
		return nil, err
	}
	if err := rlimit.RemoveMemlock(); err != nil {
		return nil, fmt.Errorf("raise RLIMIT_MEMLOCK for BPF maps: %v (run as root)", err)
	}
	m := &Monitor{
		protected: map[int]bool{},
		done:      make(chan struct{}),
		bootTime:  bootTime(),
		minSev:    Warning,
		counts:    map[countKey]*atomic.Uint64{},
	}
	if cfg.MinSeverity != "" {
		if _, err := ParseSeverity(string(cfg.MinSeverity)); err != nil {
			return nil, fmt.Errorf("config MinSeverity: %v", err)
		}
		m.minSev = cfg.MinSeverity
	}
	for _, t := range Techniques() {
		for _, sv := range Severities() {
			m.counts[countKey{t, sv}] = new(atomic.Uint64)
		}
	}
	spec, err := monitorSpec()
	if err != nil {
		return nil, err
	}
	if err := spec.LoadAndAssign(&m.objs, nil); err != nil {
		var ve *ebpf.VerifierError
		if errors.As(err, &ve) {
			return nil, fmt.Errorf("load BPF programs: the verifier refused them: %v", ve)
		}
		if errors.Is(err, unix.EPERM) {
			return nil, fmt.Errorf("load BPF programs: %v (run as root: the monitor needs CAP_BPF and CAP_PERFMON)", err)
		}
		return nil, fmt.Errorf("load BPF programs: %w", err)
	}
	// This process enters prot before the programs attach: attaching a
	// tracepoint is a CPU-wide perf_event_open, which the monitor reports
	// unless a protected process makes it. protectSelf below fills in its
	// threads and ranges.
	if err := m.objs.Prot.Put(uint32(os.Getpid()), &monitorProtectedProc{Whole: 1}); err != nil {
		m.Close()
		return nil, fmt.Errorf("protect this process: %v", err)
	}
	for _, pid := range cfg.Allow {
		if err := m.objs.Allow.Put(uint32(pid), uint8(1)); err != nil {
			m.Close()
			return nil, fmt.Errorf("allow pid %d: %v", pid, err)
		}
	}
	m.progs = map[string]*ebpf.Program{}
	m.mode, m.reason = ModeDetect, "detect-only mode was asked for (Config.DetectOnly)"
	if !cfg.DetectOnly {
		m.mode, m.reason = m.tryEnforce()
	}
	if err := m.attach(m.mode == ModeDeny); err != nil {
		m.Close()
		return nil, err
	}
	if err := m.registerOwn(); err != nil {
		m.Close()
		return nil, err
	}
	if err := m.checkHolders(cfg.Allow); err != nil {
		m.Close()
		return nil, err
	}
	if err := m.protectSelf(cfg.Self); err != nil {
		m.Close()
		return nil, err
	}
	rd, err := ringbuf.NewReader(m.objs.Events)
	if err != nil {
		m.Close()
		return nil, fmt.Errorf("open BPF ring buffer: %v", err)
	}
	m.rd = rd
	n := cfg.EventBuffer
	if n <= 0 {
		n = 1024
	}
	m.events = make(chan Event, n)
	m.wg.Add(2)
	go m.read(m.rd)
	go func() {
		defer m.wg.Done()
		select {
		case <-ctx.Done():
			go m.Close()
		case <-m.done:
		}
	}()
	return m, nil
}

// attach attaches the tracepoint programs. In deny mode (lsm) the BPF LSM
// programs report every attempt themselves, and only the two tracepoints
// that keep the protected set in step with thread creation and exit are
// attached: a syscall tracepoint, any one, puts every syscall of every
// task on the kernel's slow path (docs/monitor.md, Costs).
func (m *Monitor) attach(lsm bool) error {
	tps := []struct {
		group, name string
		prog        *ebpf.Program
		optional    bool // absent where the kernel has no such route (no open(2) on arm64, no io_uring)
		detect      bool // detect mode only: the BPF LSM covers the route in deny mode
	}{
		{"syscalls", "sys_enter_process_vm_readv", m.objs.VmReadvEnter, false, true},
		{"syscalls", "sys_exit_process_vm_readv", m.objs.VmReadvExit, false, true},
		{"syscalls", "sys_enter_process_vm_writev", m.objs.VmWritevEnter, false, true},
		{"syscalls", "sys_exit_process_vm_writev", m.objs.VmWritevExit, false, true},
		{"syscalls", "sys_enter_ptrace", m.objs.PtraceEnter, false, true},
		{"syscalls", "sys_exit_ptrace", m.objs.PtraceExit, false, true},
		{"syscalls", "sys_exit_openat", m.objs.OpenatExit, false, true},
		{"syscalls", "sys_exit_openat2", m.objs.Openat2Exit, false, true},
		{"syscalls", "sys_exit_open", m.objs.OpenLegacyExit, true, true},
		{"syscalls", "sys_exit_creat", m.objs.CreatExit, true, true},
		{"io_uring", "io_uring_complete", m.objs.RingComplete, true, true},
		{"raw_syscalls", "sys_exit", m.objs.CompatExit, false, true},
		{"syscalls", "sys_enter_pidfd_getfd", m.objs.PidfdGetfdEnter, false, true},
		{"syscalls", "sys_exit_pidfd_getfd", m.objs.PidfdGetfdExit, false, true},
		{"syscalls", "sys_enter_perf_event_open", m.objs.PerfEnter, false, true},
		{"syscalls", "sys_exit_perf_event_open", m.objs.PerfExit, false, true},
		{"syscalls", "sys_exit_bpf", m.objs.BpfExit, false, true},
		{"task", "task_newtask", m.objs.Newtask, false, false},
		{"sched", "sched_process_exit", m.objs.TaskExit, false, false},
	}
	// Exits first: an entry seen without its exit would sit in pending.
	for i := len(tps) - 1; i >= 0; i-- {
		tp := tps[i]
		if lsm && tp.detect {
			continue
		}
		m.progs[tp.name] = tp.prog
		l, err := link.Tracepoint(tp.group, tp.name, tp.prog, nil)
		if err != nil && tp.optional && errors.Is(err, os.ErrNotExist) {
			delete(m.progs, tp.name)
			continue
		}
		if err != nil {
			return fmt.Errorf("attach tracepoint %s/%s: %w", tp.group, tp.name, &NotSupportedError{
				Feature: "syscall tracepoints", Reason: err.Error() + " (the kernel needs CONFIG_FTRACE_SYSCALLS and tracefs)"})
		}
		m.links = append(m.links, l)
	}
	return nil
}

// registerOwn records the IDs of the monitor's maps, programs and links in
// the own map, so that another process taking a descriptor of one by ID
// (which is how root would edit prot and blind the monitor without
// stopping it) is reported (bpf_fd).
func (m *Monitor) registerOwn() error {
	pid := uint32(os.Getpid())
	m.ownLines = map[string]bool{}
	put := func(cmd uint64, id uint32) error {
		if err := m.objs.Own.Put(cmd<<32|uint64(id), pid); err != nil {
			return fmt.Errorf("record the monitor's BPF object %d: %v", id, err)
		}
		m.ownLines[ownFdinfo(cmd, id)] = true
		return nil
	}
	sets := []any{&m.objs.monitorMaps, &m.objs.monitorPrograms}
	if m.enforce != nil {
		sets = append(sets, &m.enforce.enforceMaps, &m.enforce.enforcePrograms)
	}
	for _, set := range sets {
		v := reflect.ValueOf(set).Elem()
		for i := range v.NumField() {
			switch o := v.Field(i).Interface().(type) {
			case *ebpf.Map:
				info, err := o.Info()
				if err != nil {
					return fmt.Errorf("read the ID of the monitor's map: %v", err)
				}
				if id, ok := info.ID(); ok {
					if err := put(bpfMapGetFDByID, uint32(id)); err != nil {
						return err
					}
				}
			case *ebpf.Program:
				info, err := o.Info()
				if err != nil {
					return fmt.Errorf("read the ID of the monitor's program: %v", err)
				}
				if id, ok := info.ID(); ok {
					if err := put(bpfProgGetFDByID, uint32(id)); err != nil {
						return err
					}
				}
				// Every map the program uses, the ones that hold its
				// global variables (.bss: inflight, which the exit
				// programs read first) among them: the loader names
				// those nowhere else.
				ids, ok := info.MapIDs()
				if !ok {
					return fmt.Errorf("read the maps of the monitor's program %s: this kernel does not say (Linux 4.15+)", info.Name)
				}
				for _, id := range ids {
					if err := put(bpfMapGetFDByID, uint32(id)); err != nil {
						return err
					}
				}
			}
		}
	}
	for _, l := range m.links {
		// A link attached without bpf_link (old kernels) has no ID, and
		// nothing to take a descriptor of.
		if info, err := l.Info(); err == nil {
			if err := put(bpfLinkGetFDByID, uint32(info.ID)); err != nil {
				return err
			}
		}
	}
	return nil
}

// ensureTracefs mounts tracefs where the kernel has it but nobody mounted
// it, since attaching to a tracepoint reads its id there.
func ensureTracefs() error {
	for _, d := range []string{"/sys/kernel/tracing/events", "/sys/kernel/debug/tracing/events"} {
		_, err := os.Stat(d)
		if err == nil {
			return nil
		}
		if errors.Is(err, fs.ErrPermission) {
			return fmt.Errorf("%v (the monitor needs root: CAP_BPF, CAP_PERFMON and access to tracefs)", err)
		}
	}
	if err := unix.Mount("tracefs", "/sys/kernel/tracing", "tracefs", 0, ""); err != nil {
		return &NotSupportedError{Feature: "tracefs", Reason: fmt.Sprintf(
			"mount tracefs on /sys/kernel/tracing: %v (mount it, as root: mount -t tracefs nodev /sys/kernel/tracing)", err)}
	}
	return nil
}

func bootTime() time.Time {
	var ts unix.Timespec
	now := time.Now()
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		return now
	}
	return now.Add(-time.Duration(ts.Nano()))
}

// MonotonicNow is CLOCK_MONOTONIC now, the clock of Event.KernelNS; the
// difference is an event's latency.
func MonotonicNow() uint64 {
	var ts unix.Timespec
	_ = unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts)
	return uint64(ts.Nano())
}

func (m *Monitor) protectSelf(reg *keymem.Registry) error {
	self := os.Getpid()
	if reg == nil {
		return m.Protect(self, nil)
	}
	if err := m.protect(self, nil, false); err != nil {
		return err
	}
	m.stopSelf = reg.Watch(func(rs []keymem.Range) {
		conv := make([]Range, len(rs))
		for i, r := range rs {
			conv[i] = Range{r.Start, r.End}
		}
		if err := m.protect(self, conv, false); err != nil {
			m.mu.Lock()
			m.selfErr = err
			m.mu.Unlock()
		}
	})
	return nil
}

// Protect registers pid (a process id) and the ranges of its key pages. With
// no ranges the whole address space counts as key pages. Calling it again
// replaces the ranges.
func (m *Monitor) Protect(pid int, ranges []Range) error {
	return m.protect(pid, ranges, len(ranges) == 0)
}

func (m *Monitor) protect(pid int, ranges []Range, whole bool) error {
	if pid <= 0 {
		return fmt.Errorf("protect pid %d: not a process id", pid)
	}
	var v monitorProtectedProc
	rs := normalize(ranges, MaxRanges)
	v.N = uint32(len(rs))
	for i, r := range rs {
		v.R[i].Start, v.R[i].End = r.Start, r.End
	}
	if whole {
		v.Whole = 1
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	// prot first: from then on the kernel adds new threads to targets itself,
	// so the listing below cannot miss one created in between.
	if err := m.objs.Prot.Put(uint32(pid), &v); err != nil {
		return fmt.Errorf("protect pid %d: %v", pid, err)
	}
	tids, err := os.ReadDir("/proc/" + strconv.Itoa(pid) + "/task")
	if err != nil {
		_ = m.objs.Prot.Delete(uint32(pid))
		return fmt.Errorf("protect pid %d: %v (is the process running?)", pid, err)
	}
	if err := m.objs.Targets.Put(uint32(pid), uint32(pid)); err != nil {
		return fmt.Errorf("protect pid %d: %v", pid, err)
	}
	for _, t := range tids {
		tid, err := strconv.Atoi(t.Name())
		if err != nil || tid == pid {
			continue
		}
		if err := m.objs.Targets.Put(uint32(tid), uint32(pid)); err != nil {
			return fmt.Errorf("protect pid %d thread %d: %v", pid, tid, err)
		}
	}
	m.protected[pid] = true
	return nil
}

// Unprotect stops watching pid.
func (m *Monitor) Unprotect(pid int) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	delete(m.protected, pid)
	var tid, tgid uint32
	var stale []uint32
	it := m.objs.Targets.Iterate()
	for it.Next(&tid, &tgid) {
		if tgid == uint32(pid) {
			stale = append(stale, tid)
		}
	}
	for _, t := range stale {
		_ = m.objs.Targets.Delete(t)
	}
	if err := m.objs.Prot.Delete(uint32(pid)); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("unprotect pid %d: %v", pid, err)
	}
	return nil
}

// Mode returns the mode in force and why: for detect mode, what deny mode
// would need.
func (m *Monitor) Mode() (Mode, string) { return m.mode, m.reason }

// Events delivers the events in the order the kernel recorded them. It is
// closed by Close.
func (m *Monitor) Events() <-chan Event { return m.events }

// ProgramStat is what one of the monitor's BPF programs has cost so far.
type ProgramStat struct {
	Runs    uint64        `json:"runs"`
	Runtime time.Duration `json:"runtime_ns"`
}

// ProgramStats reports, per tracepoint (and in deny mode per LSM hook, as
// "lsm/ptrace_access_check" and so on), how often its program ran and for how long
// in all. The kernel counts only while statistics are enabled
// (EnableStats, or sysctl kernel.bpf_stats_enabled=1), so that the cost of
// the monitor itself can be measured.
func (m *Monitor) ProgramStats() (map[string]ProgramStat, error) {
	out := make(map[string]ProgramStat, len(m.progs))
	for name, p := range m.progs {
		st, err := p.Stats()
		if err != nil {
			return nil, fmt.Errorf("read statistics of %s: %v", name, err)
		}
		out[name] = ProgramStat{Runs: st.RunCount, Runtime: st.Runtime}
	}
	return out, nil
}

// EnableStats has the kernel count the run time of BPF programs until the
// returned Closer is closed. Counting costs a little on every run.
func EnableStats() (io.Closer, error) {
	c, err := ebpf.EnableStats(uint32(unix.BPF_STATS_RUN_TIME))
	if err != nil {
		return nil, fmt.Errorf("enable BPF run-time statistics: %v", err)
	}
	return c, nil
}

// Close detaches the programs and frees the maps; protection ends.
func (m *Monitor) Close() error {
	m.closeOnce.Do(func() {
		close(m.done)
		if m.stopSelf != nil {
			m.stopSelf()
		}
		var errs []error
		for _, l := range m.links {
			errs = append(errs, l.Close())
		}
		if m.rd != nil {
			errs = append(errs, m.rd.Close())
		}
		if m.enforce != nil {
			errs = append(errs, m.enforce.Close())
		}
		errs = append(errs, m.objs.Close())
		m.closeErr = errors.Join(errs...)
	})
	m.wg.Wait()
	return m.closeErr
}
