package api

import "time"

// Event is one monitor alert or heartbeat a VM reports in POST /v1/events:
// a flat JSON object. Kind and Severity are required. The other fields are
// optional; a monitor alert (keygate's eBPF monitor) fills the ones that
// describe who reached for the protected process's memory, how, and what
// the kernel answered. docs/protocol.md lists the fields and their limits;
// checkEvent enforces them.
type Event struct {
	// Kind is "heartbeat", or for a monitor alert the technique
	// ("ptrace_attach", "process_vm_readv", "proc_mem", …): 1 to 64 bytes
	// of a-z, 0-9, '_', '.' and '-'.
	Kind     string     `json:"kind"`
	Severity string     `json:"severity"`       // "info", "warning" or "critical"
	Time     *time.Time `json:"time,omitempty"` // when the VM saw it (RFC 3339)

	// The accessor: the process that made the attempt.
	PID  int     `json:"pid,omitempty"`  // process ID
	Comm string  `json:"comm,omitempty"` // command name, at most 64 bytes
	Exe  string  `json:"exe,omitempty"`  // executable path, at most 1024 bytes
	UID  *uint32 `json:"uid,omitempty"`  // user ID (0 is root, hence a pointer)

	// What it reached for.
	TargetPID    int    `json:"target_pid,omitempty"`    // the protected process; absent for /proc/kcore, /dev/mem
	Addr         uint64 `json:"addr,omitempty"`          // first remote address the request named
	Len          uint64 `json:"len,omitempty"`           // length of that range
	Overlap      bool   `json:"overlap,omitempty"`       // the access could reach key pages
	OverlapBytes uint64 `json:"overlap_bytes,omitempty"` // bytes of key pages it covered
	Path         string `json:"path,omitempty"`          // the path opened, at most 1024 bytes

	// What happened.
	Result *int64 `json:"result,omitempty"` // the syscall's return value; negative is -errno
	Denied bool   `json:"denied,omitempty"` // refused by the monitor's BPF LSM programs
	Mode   string `json:"mode,omitempty"`   // the monitor's mode in force: "detect" or "deny"

	Message string `json:"message,omitempty"` // free text, at most 1024 bytes
}

// Limits of an Event's strings.
const (
	MaxEventKind = 64
	MaxEventComm = 64
	MaxEventText = 1024 // exe, path, message
	MaxEventMode = 16
)

// KindHeartbeat is the kind of the VM's periodic heartbeat.
const KindHeartbeat = "heartbeat"

// EventRecord is how the admin API shows a stored event: the event's own
// fields, flattened, after the service's.
type EventRecord struct {
	ID        int64     `json:"id"`
	Received  time.Time `json:"received"`
	VM        string    `json:"vm"`
	Volume    string    `json:"volume"`
	SessionID string    `json:"session_id"`
	Event
}

// DefaultEventList is how many events GET /v1/admin/events returns when no
// limit is given.
const DefaultEventList = 100
