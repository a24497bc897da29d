package dashboard

import (
	"context"
	"errors"
	"time"
)

// ErrNotFound is what a Backend returns for a VM or volume that does not
// exist.
var ErrNotFound = errors.New("not found")

// VM states, as the fleet shows them.
const (
	StateServing       = "serving"        // unlocked, heartbeats arriving
	StateLocked        = "locked"         // unlocked once, no heartbeat since StaleAfter
	StateRevoked       = "revoked"        // revoked by an administrator
	StateNeverUnlocked = "never unlocked" // no key was ever released to it
)

// VMRow is one VM of the fleet.
type VMRow struct {
	Name          string
	State         string
	LastAttested  time.Time // the last released key (zero: never)
	LastHeartbeat time.Time // zero: none
	Stale         bool      // unlocked, but no heartbeat for StaleAfter
	Mode          string    // the monitor's mode its last alert named: detect, deny, or ""
	LearnArmed    bool
	Warning       int // open alerts: since its last unlock
	Critical      int
	Tampered      string // why the VM's row fails its integrity check
}

// Series are the fleet's counts per Step from Start, for the charts.
type Series struct {
	Start   time.Time
	Step    time.Duration
	Unlocks []int
	Denials []int
	Alerts  []int
}

// Fleet is what the fleet page shows.
type Fleet struct {
	VMs         []VMRow
	Series      Series
	LastEventID int64 // the stream resumes after it
}

// Mismatch is one PCR a denied unlock did not match.
type Mismatch struct {
	PCR     int
	Allowed []string
	Got     string
}

// Entry kinds of a VM's timeline.
const (
	EntryUnlock    = "unlock"
	EntryDenial    = "denial"
	EntryAlert     = "alert"
	EntryHeartbeat = "heartbeat"
)

// Entry is one line of a VM's timeline.
type Entry struct {
	Time     time.Time
	Kind     string // one of the Entry kinds
	Volume   string
	Severity string // alerts
	EventID  int64  // alerts and heartbeats: the stored event
	// A denial's reason and PCR diff.
	Reason     string
	Mismatches []Mismatch
	Rules      []string
	// An alert's accessor and what it did: attacker-controlled text, shown
	// as text.
	Technique    string
	PID          int
	Comm         string
	Exe          string
	UID          string // "" if unknown
	Path         string
	Overlap      bool
	OverlapBytes uint64
	Denied       bool
	Mode         string
}

// Volume is a protected volume (never its key).
type Volume struct {
	ID       string
	VM       string
	Erased   bool
	ErasedAt time.Time
	Created  time.Time
	Tampered string
}

// VMDetail is what a VM's page shows.
type VMDetail struct {
	VMRow
	Policy      string // indented JSON
	Volumes     []Volume
	Timeline    []Entry // newest first
	LastEventID int64
}

// AuditState is the audit chain's last verification.
type AuditState struct {
	OK         bool
	Records    uint64
	VerifiedTo uint64 // the last record that verified
	At         time.Time
	Problems   []string
}

// Backend reads what the pages show and carries out their actions. keysvc's
// Server implements it. actor names the session for the audit chain.
type Backend interface {
	// CheckToken reports, in constant time, whether token is the admin
	// token.
	CheckToken(token string) bool
	// Audit records a dashboard event best-effort: a login, a refused
	// login or action, a logout. ok is its outcome.
	Audit(ctx context.Context, actor, what, remote string, ok bool)
	Fleet(ctx context.Context) (Fleet, error)
	// VM returns the named VM's page, or ErrNotFound.
	VM(ctx context.Context, name string) (VMDetail, error)
	Volumes(ctx context.Context) ([]Volume, error)
	// AuditState verifies the chain (at most every so often: it is a full
	// read) and says how it stood.
	AuditState(ctx context.Context) (AuditState, error)
	// Revoke, Erase and ArmLearn change state: each is in the audit chain
	// before it is made (fail-closed). ErrNotFound if there is no such VM
	// or volume.
	Revoke(ctx context.Context, actor, vm string) error
	Erase(ctx context.Context, actor, volume string) error
	ArmLearn(ctx context.Context, actor, vm string) error
}
