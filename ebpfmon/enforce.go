package ebpfmon

import (
	"errors"
	"fmt"
	"os"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"
)

const lsmFile = "/sys/kernel/security/lsm"

// ActiveLSMs reads the kernel's list of active LSMs, mounting securityfs
// where it is not mounted yet.
func ActiveLSMs() ([]string, error) {
	b, err := os.ReadFile(lsmFile)
	if errors.Is(err, os.ErrNotExist) {
		if merr := unix.Mount("securityfs", "/sys/kernel/security", "securityfs", 0, ""); merr == nil {
			b, err = os.ReadFile(lsmFile)
		}
	}
	if err != nil {
		return nil, fmt.Errorf("read the active LSMs: %v (mount securityfs: mount -t securityfs none /sys/kernel/security)", err)
	}
	return strings.Split(strings.TrimSpace(string(b)), ","), nil
}

// tryEnforce loads and attaches the BPF LSM programs. It returns the mode in
// force and the reason; a BPF LSM that is not among the active LSMs would load
// and attach without ever being called, so deny mode is claimed only when the
// list names it and the programs attached.
func (m *Monitor) tryEnforce() (Mode, string) {
	lsms, err := ActiveLSMs()
	if err != nil {
		return ModeDetect, err.Error() + "; running in detect-only mode"
	}
	active := false
	for _, l := range lsms {
		active = active || l == "bpf"
	}
	if !active {
		return ModeDetect, fmt.Sprintf("BPF LSM is not active (active LSMs: %s; add \"bpf\" to the lsm= boot parameter); running in detect-only mode",
			strings.Join(lsms, ","))
	}
	var objs enforceObjects
	err = loadEnforceObjects(&objs, &ebpf.CollectionOptions{MapReplacements: map[string]*ebpf.Map{
		"prot": m.objs.Prot, "targets": m.objs.Targets, "allow": m.objs.Allow,
		"events": m.objs.Events, "drops": m.objs.Drops,
	}})
	if err != nil {
		// cilium/ebpf's hint about MEMLOCK is beside the point: Start
		// removed the limit before loading anything.
		why := strings.Replace(err.Error(), " (MEMLOCK may be too low, consider rlimit.RemoveMemlock)", "", 1)
		if errors.Is(err, unix.EPERM) {
			why += lockdownHint()
		}
		return ModeDetect, "the kernel refused to load the BPF LSM programs: " + why + "; running in detect-only mode"
	}
	var attached []link.Link
	for _, p := range lsmHooks(&objs) {
		l, err := link.AttachLSM(link.LSMOptions{Program: p.prog})
		if err != nil {
			for _, l := range attached {
				l.Close()
			}
			objs.Close()
			return ModeDetect, "attach BPF LSM program " + p.hook + ": " + err.Error() + "; running in detect-only mode"
		}
		attached = append(attached, l)
		m.progs["lsm/"+p.hook] = p.prog
	}
	m.links = append(m.links, attached...)
	m.enforce = &objs
	return ModeDeny, "BPF LSM programs attached, no syscall tracepoints: ptrace_access_check reports and denies ptrace attach/seize, " +
		"process_vm_readv/writev, pidfd_getfd and opens of /proc/PID/mem on protected processes, and reports opens of their " +
		"environ and maps; locked_down reports and denies opens of /proc/kcore and /dev/mem; perf_event_open reports " +
		"perf events on protected processes, CPUs and cgroups"
}

// lsmHook is one BPF LSM program and the hook it attaches to.
type lsmHook struct {
	hook string
	prog *ebpf.Program
}

// lsmHooks lists deny mode's programs. None is on a hook every open (or
// any other frequent syscall) passes: in the test VM the trampoline of an
// empty lsm/file_open program alone cost open+close about as much as the
// program that judged every open there (docs/monitor.md, Costs). Opens of
// /proc/PID/mem, environ and maps are seen in ptrace_access_check, which
// procfs calls from the open (mm_access), and kcore and /dev/mem in
// locked_down, which their open functions call.
func lsmHooks(objs *enforceObjects) []lsmHook {
	return []lsmHook{
		{"ptrace_access_check", objs.DenyPtrace},
		{"locked_down", objs.DenyLockdown},
		{"perf_event_open", objs.ReportPerf},
	}
}

// lockdownHint names kernel lockdown when it is on, the usual reason root
// cannot load LSM programs.
func lockdownHint() string {
	b, err := os.ReadFile("/sys/kernel/security/lockdown")
	if err != nil {
		return ""
	}
	s := strings.TrimSpace(string(b))
	i, j := strings.IndexByte(s, '['), strings.IndexByte(s, ']')
	if i < 0 || j < i || s[i+1:j] == "none" {
		return ""
	}
	return " (kernel lockdown is in " + s[i+1:j] + " mode, which may forbid BPF LSM programs)"
}
