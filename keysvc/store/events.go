package store

import (
	"context"
	"time"
)

// VMEvent is an event a VM reported (POST /v1/events): a monitor alert or a
// heartbeat.
type VMEvent struct {
	ID       int64     // set by the store: increasing, never reused
	Received time.Time // when the key service accepted it
	VM       string
	Volume   string
	Session  string // the session's ID (never its bearer token)
	Kind     string
	Severity string // one of Severities
	// Data is the event as the key service accepted it, a JSON object; the
	// store checks only that it is valid JSON.
	Data []byte
}

// Severities are the event severities, lowest first.
var Severities = []string{"info", "warning", "critical"}

// SeverityRank is s's index in Severities, or -1 if s is none of them.
func SeverityRank(s string) int {
	for i, v := range Severities {
		if v == s {
			return i
		}
	}
	return -1
}

// MaxEventList bounds how many events one ListEvents returns.
const MaxEventList = 1000

// EventFilter selects events for ListEvents. Zero fields select everything.
type EventFilter struct {
	VM          string
	Kind        string
	Since       time.Time // received at or after
	MinSeverity string    // this severity and the ones above it
	Limit       int       // 1 to MaxEventList; 0 means MaxEventList
}

// Events stores the events VMs report.
type Events interface {
	// AddEvents stores evs in one transaction (all or none) and returns them
	// with their IDs, in order.
	AddEvents(ctx context.Context, evs []VMEvent) ([]VMEvent, error)
	// ListEvents returns the events f selects, newest first.
	ListEvents(ctx context.Context, f EventFilter) ([]VMEvent, error)
	// PurgeEvents forgets events received before before and returns how
	// many it removed.
	PurgeEvents(ctx context.Context, before time.Time) (int64, error)
}
