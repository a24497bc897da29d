package ebpfmon

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"os"
	"strconv"
	"time"
	"unsafe"
)

// Technique names one way of reaching another process's memory. The names
// are stable: they are JSON values, Prometheus labels and keysvc event kinds.
type Technique string

// Techniques, in the order of the BPF program's enum (bpf/monitor.c).
const (
	ProcessVMReadv  Technique = "process_vm_readv"
	ProcessVMWritev Technique = "process_vm_writev"
	PtraceAttach    Technique = "ptrace_attach"
	PtraceSeize     Technique = "ptrace_seize"
	PtracePeek      Technique = "ptrace_peek"
	PtracePoke      Technique = "ptrace_poke"
	ProcMem         Technique = "proc_mem"
	ProcEnviron     Technique = "proc_environ"
	ProcMaps        Technique = "proc_maps"
	PidfdGetfd      Technique = "pidfd_getfd"
	PerfEventOpen   Technique = "perf_event_open"
	Kcore           Technique = "kcore"
	DevMem          Technique = "dev_mem"
	// EventsLost is the monitor's own: the kernel dropped events (its ring
	// buffer was full), any of which may have been critical. Arg is how
	// many were dropped since the last such event.
	EventsLost Technique = "events_lost"
	// BPFFD is another process taking a descriptor of one of the
	// monitor's own BPF maps, programs or links by ID (bpf(2)'s
	// *_GET_FD_BY_ID): with a map's, it can edit what the monitor
	// protects. Arg is the command << 32 | the object's ID.
	BPFFD Technique = "bpf_fd"
	// BPFProgLoad is another process loading a BPF program, which can read
	// a key holder's memory from inside the kernel whenever it runs in the
	// key holder's context (every program type can call
	// bpf_probe_read_user when its loader has CAP_PERFMON); what it reads
	// there the monitor cannot see. Arg is the program type.
	BPFProgLoad Technique = "bpf_prog_load"
)

var techniques = [...]Technique{"", ProcessVMReadv, ProcessVMWritev, PtraceAttach, PtraceSeize,
	PtracePeek, PtracePoke, ProcMem, ProcEnviron, ProcMaps, PidfdGetfd, PerfEventOpen, Kcore, DevMem, BPFFD, BPFProgLoad}

// Techniques lists every technique the monitor reports.
func Techniques() []Technique { return append(append([]Technique(nil), techniques[1:]...), EventsLost) }

// Severity grades an event. The values are keysvc's (info, warning, critical).
type Severity string

const (
	Info     Severity = "info"     // a read that reveals layout, not key bytes (/proc/<pid>/maps, environ)
	Warning  Severity = "warning"  // access to the process that misses the key pages
	Critical Severity = "critical" // access that can reach the key pages
)

// Severities lists the severities from lowest to highest.
func Severities() []Severity { return []Severity{Info, Warning, Critical} }

// Flags from bpf/monitor.c.
const (
	flagOverlap   = 1
	flagTruncated = 2
	flagWhole     = 4
	flagResolved  = 8
	flagOpenat2   = 16
	flagDenied    = 32
	flagOpen      = 64
	flagCreat     = 128
	flagIOUring   = 256
	flagCompat    = 512
	flagPerfCPU   = 1024
	flagPerfCgrp  = 2048
	flagIovChange = 4096
	flagIovUnread = 8192
)

// Event is one attempt to reach a protected process's memory (or all of
// memory, for /proc/kcore and /dev/mem), as the kernel saw it.
type Event struct {
	Time time.Time `json:"time"` // when the syscall was entered; for opens, when it returned
	// KernelNS is that time on CLOCK_MONOTONIC, and ReceivedNS when the
	// event reached user space: the difference is the alert's latency.
	KernelNS   uint64 `json:"kernel_ns"`
	ReceivedNS uint64 `json:"received_ns"`

	// The accessor.
	PID      int    `json:"pid"`  // thread id
	TGID     int    `json:"tgid"` // process id
	Comm     string `json:"comm"`
	Exe      string `json:"exe"` // full path where /proc still had it, else the kernel's base name
	UID      int    `json:"uid"`
	CgroupID uint64 `json:"cgroup_id"`

	Technique Technique `json:"technique"`
	Severity  Severity  `json:"severity"`
	Mode      Mode      `json:"mode"`       // the monitor's mode when the event arrived
	Target    int       `json:"target"`     // the pid as the caller named it (a tid, perhaps)
	TargetPID int       `json:"target_pid"` // its process; 0 for kcore and /dev/mem

	// Memory the request covers: the first remote range that touches key
	// pages, or the first range when none does; bytes in all ranges; bytes of
	// key pages among them. For opens of /proc/<pid>/mem, /proc/kcore and
	// /dev/mem Overlap is true: the file reaches every page.
	Addr         uint64 `json:"addr,omitempty"`
	Len          uint64 `json:"len,omitempty"`
	Bytes        uint64 `json:"bytes,omitempty"`
	OverlapBytes uint64 `json:"overlap_bytes,omitempty"`
	Overlap      bool   `json:"overlap"`
	Ranges       int    `json:"ranges,omitempty"` // remote iovecs named
	Truncated    bool   `json:"truncated,omitempty"`

	// IovChanged: the remote iovecs read when the syscall returned differ
	// from those read when it was entered (another thread rewrote them
	// mid-call); the graver reading counts. IovUnread: neither reading
	// could be made, so the ranges are unknown.
	IovChanged bool `json:"iov_changed,omitempty"`
	IovUnread  bool `json:"iov_unread,omitempty"`

	// Via is the route of an open: openat, openat2, open, creat or
	// io_uring (a ring's IORING_OP_OPENAT/OPENAT2, seen at completion: no
	// path, no flags). Compat says the syscall was a 32-bit one (int 0x80).
	Via    string `json:"via,omitempty"`
	Compat bool   `json:"compat,omitempty"`
	// Scope is set for a perf_event_open that names no process: "cpu"
	// (pid -1: every task on a CPU) or "cgroup" (every task of a cgroup).
	// Either samples the key holder whenever it runs there; TargetPID is 0.
	Scope string `json:"scope,omitempty"`
	// SampleType is perf_event_open's attr.sample_type: what each sample
	// copies out of the task it interrupts.
	SampleType uint64 `json:"sample_type,omitempty"`

	Path   string `json:"path,omitempty"` // the path as passed to the open syscall
	Arg    uint64 `json:"arg,omitempty"`  // ptrace request, open flags, perf type, pidfd_getfd's fd, or how many events were lost (events_lost)
	Result int64  `json:"result"`         // the syscall's return value; negative is -errno
	// Denied says the kernel refused this attempt because of our BPF LSM
	// program: the program that refused sent this event itself (deny mode
	// reports every attempt from its LSM programs). The errno alone cannot
	// say it (the kernel's own checks return EPERM too), so it is never
	// inferred from Result. Never set in detect mode, where no LSM program
	// runs.
	Denied bool `json:"denied,omitempty"`
}

// Succeeded reports whether the syscall succeeded.
func (e Event) Succeeded() bool { return e.Result >= 0 }

// String is a one-line summary for logs.
func (e Event) String() string {
	if e.Technique == EventsLost {
		return fmt.Sprintf("%s %s: the kernel dropped %d events (ring buffer full; the monitor's reader fell behind), any of which may have been an attempt on the key pages", e.Severity, e.Technique, e.Arg)
	}
	s := fmt.Sprintf("%s %s by pid %d (%s, uid %d) on pid %d", e.Severity, e.Technique, e.TGID, e.Comm, e.UID, e.TargetPID)
	if e.Path != "" {
		s += " path " + strconv.Quote(e.Path)
	}
	if e.Via != "" && e.Via != "openat" {
		s += " via " + e.Via
	}
	if e.Compat {
		s += " (32-bit syscall)"
	}
	if e.Scope != "" {
		s += " on every task of a " + e.Scope
	}
	if e.Technique == BPFProgLoad {
		s += fmt.Sprintf(" (BPF program type %d: can read the memory of whichever task it runs in)", e.Arg)
	}
	if e.Technique == BPFFD {
		s += fmt.Sprintf(" (bpf command %d, object id %d: a descriptor of the monitor's own map, program or link)", e.Arg>>32, e.Arg&0xffffffff)
	}
	if e.Addr != 0 || e.Len != 0 {
		s += fmt.Sprintf(" addr %#x+%d", e.Addr, e.Len)
	}
	if e.Overlap {
		s += " (key pages)"
	}
	return s + fmt.Sprintf(" result %d", e.Result)
}

// rawSize is the size of the kernel's struct event.
const rawSize = int(unsafe.Sizeof(monitorEvent{}))

// decodeRecord parses one ringbuf record. The record comes from our own
// program, but a mismatch between program and Go (a stale .o) must give an
// error, not garbage.
func decodeRecord(b []byte) (monitorEvent, error) {
	var raw monitorEvent
	if len(b) < rawSize {
		return raw, fmt.Errorf("ringbuf record is %d bytes, want %d (are the BPF objects stale? run make generate)", len(b), rawSize)
	}
	if _, err := binary.Decode(b[:rawSize], binary.NativeEndian, &raw); err != nil {
		return raw, fmt.Errorf("decode ringbuf record: %v", err)
	}
	if raw.Technique == 0 || int(raw.Technique) >= len(techniques) {
		return raw, fmt.Errorf("ringbuf record names technique %d, which this build does not know", raw.Technique)
	}
	return raw, nil
}

// toEvent turns a raw record into an Event: the severity policy lives here,
// in Go, so the kernel side only reports facts.
func toEvent(raw monitorEvent, bootTime time.Time, mode Mode) Event {
	e := Event{
		Time:         bootTime.Add(time.Duration(raw.Ktime)),
		KernelNS:     raw.Ktime,
		PID:          int(raw.Pid),
		TGID:         int(raw.Tgid),
		Comm:         cString(raw.Comm[:]),
		Exe:          cString(raw.Exe[:]),
		UID:          int(raw.Uid),
		CgroupID:     raw.CgroupId,
		Technique:    techniques[raw.Technique],
		Mode:         mode,
		Target:       int(raw.Target),
		TargetPID:    int(raw.TargetTgid),
		Addr:         raw.Addr,
		Len:          raw.Len,
		Bytes:        raw.Total,
		OverlapBytes: raw.Overlap,
		Overlap:      raw.Flags&flagOverlap != 0,
		Ranges:       int(raw.Niov),
		Truncated:    raw.Flags&flagTruncated != 0,
		Path:         cString(raw.Path[:]),
		Arg:          raw.Arg,
		Result:       raw.Result,
		Denied:       raw.Flags&flagDenied != 0,
	}
	e.SampleType = raw.SampleType
	e.IovChanged = raw.Flags&flagIovChange != 0
	e.IovUnread = raw.Flags&flagIovUnread != 0
	e.Compat = raw.Flags&flagCompat != 0
	switch {
	case raw.Flags&flagPerfCPU != 0:
		e.Scope = "cpu"
	case raw.Flags&flagPerfCgrp != 0:
		e.Scope = "cgroup"
	}
	switch e.Technique {
	case ProcMem, ProcEnviron, ProcMaps, Kcore, DevMem:
		switch {
		case raw.Flags&flagIOUring != 0:
			e.Via = "io_uring"
		case raw.Flags&flagOpen != 0:
			e.Via = "open"
		case raw.Flags&flagCreat != 0:
			e.Via = "creat"
		case raw.Flags&flagOpenat2 != 0:
			e.Via = "openat2"
		default:
			e.Via = "openat"
		}
	}
	e.Severity = severityOf(e)
	return e
}

// severityOf is the severity policy. Anything that can reach key bytes is
// critical; so is an attach or seize (the tracer can then read anything) and
// pidfd_getfd (it can take a memfd_secret or a key file's descriptor). What
// touches the process away from its key pages is a warning; layout and
// environment reads are info.
func severityOf(e Event) Severity {
	switch e.Technique {
	case ProcEnviron, ProcMaps:
		return Info
	case PtraceAttach, PtraceSeize, PidfdGetfd, ProcMem, Kcore, DevMem, EventsLost, BPFFD:
		return Critical
	case BPFProgLoad:
		// The capability to read the key holder's memory, not a read: as
		// for perf_event_open on the process.
		return Warning
	case PerfEventOpen:
		// On the process itself: its samples can carry registers and stack.
		// Without a process (a CPU's or a cgroup's events), only samples
		// that copy registers or stack can carry key bytes out of whichever
		// task they interrupt; the rest (counting, tracepoints: every BPF
		// tool attaches its programs this way) is info.
		if e.Scope != "" && e.SampleType&perfSamplesMemory == 0 {
			return Info
		}
		return Warning
	}
	// Ranges that changed mid-call, or could not be read while the call
	// succeeded, may have reached the key pages: no benign caller does either.
	if e.Overlap || e.Truncated || e.IovChanged || (e.IovUnread && e.Succeeded()) {
		return Critical
	}
	// In detect mode the ranges are the caller's memory as read at entry
	// and at exit; the kernel copies them in between, and the caller can
	// stop the kernel there (userfaultfd on its local iovec array and
	// buffer) and show both reads a harmless vector around a read of the
	// key (TestReadvSwappedMidCall). So a call that succeeded may have read
	// the key pages whatever its ranges; against keygate boot, which is not
	// dumpable, it took CAP_SYS_PTRACE. Deny mode judges the ranges in the
	// kernel's check and refuses the call.
	if (e.Technique == ProcessVMReadv || e.Technique == ProcessVMWritev) && e.Mode == ModeDetect && e.Succeeded() {
		return Critical
	}
	return Warning
}

// perfSamplesMemory are the perf sample types that copy a task's registers
// or user stack into the sample: PERF_SAMPLE_REGS_USER, STACK_USER,
// REGS_INTR.
const perfSamplesMemory = 1<<12 | 1<<13 | 1<<18

// ParseSeverity parses a severity name (info, warning, critical).
func ParseSeverity(s string) (Severity, error) {
	for _, v := range Severities() {
		if string(v) == s {
			return v, nil
		}
	}
	return "", fmt.Errorf("severity %q: use info, warning or critical", s)
}

// AtLeast reports whether s is at or above min.
func (s Severity) AtLeast(min Severity) bool { return rank(s) >= rank(min) }

func cString(b []int8) string {
	u := unsafe.Slice((*byte)(unsafe.Pointer(unsafe.SliceData(b))), len(b))
	if i := bytes.IndexByte(u, 0); i >= 0 {
		u = u[:i]
	}
	return string(u)
}

// exePath reads the accessor's executable while it still runs; the kernel
// record only carries the base name.
func exePath(tgid int, base string) string {
	p, err := os.Readlink("/proc/" + strconv.Itoa(tgid) + "/exe")
	if err != nil {
		return base
	}
	return p
}
