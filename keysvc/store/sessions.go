package store

import (
	"context"
	"time"
)

// Session state shared by every replica (issue 15): the key service's own
// sealed secrets, and the re-attestation state of serving sessions. Both
// are apart from Store, like Rotations, so that a backend without them
// still builds; the key service asks for them with a type assertion.

// ServiceKeys stores secrets of the key service itself, sealed under the
// master key by the caller (the store keeps the bytes as given).
type ServiceKeys interface {
	// ClaimServiceKey stores sealed under name if nothing is stored there
	// yet, and returns what is stored (sealed, if it was just stored): of
	// replicas claiming at once, one wins and all get its bytes.
	ClaimServiceKey(ctx context.Context, name string, sealed []byte) ([]byte, error)
	// RekeyServiceKeys runs fn on every stored key in one write transaction
	// and stores what it returns (a master-key rotation re-seals them); if
	// fn fails nothing is written. It returns how many it re-sealed.
	RekeyServiceKeys(ctx context.Context, fn func(name string, sealed []byte) ([]byte, error)) (int, error)
}

// ReattestSession is the re-attestation state of one serving session.
// Zero times are unset.
type ReattestSession struct {
	ID, VM, Volume string
	Interval       time.Duration // the VM's re-attestation period
	Last           time.Time     // last good re-attestation
	Due            time.Time     // stale if no good re-attestation by then
	Locked         time.Time     // when a failed re-attestation locked it
	Stale          time.Time     // when a sweep flagged it stale
	// MAC is the key service's, over ID, VM, Volume and Locked; the store
	// keeps it as given.
	MAC []byte
}

// IsLocked reports whether a failed re-attestation locked the session.
func (s ReattestSession) IsLocked() bool { return !s.Locked.IsZero() }

// ReattestSessions stores the re-attestation state of serving sessions, so
// that a lock decided at one replica holds at every replica and across
// restarts, and a stale session is flagged once fleet-wide.
type ReattestSessions interface {
	// ReattestSeen records a good re-attestation: it inserts s (with its
	// MAC, Locked and Stale unset) if the session has no row, and otherwise
	// sets its Interval, Last and Due and clears Stale. A locked session's
	// row is left as it is. It returns the row as it was before
	// (ErrNotFound if there was none).
	ReattestSeen(ctx context.Context, s ReattestSession) (ReattestSession, error)
	// LockSession stores the session as locked at s.Locked, with s.MAC,
	// inserting its row if it has none. A session locked already keeps
	// its first lock.
	LockSession(ctx context.Context, s ReattestSession) error
	// GetReattestSession returns the session's row, or ErrNotFound.
	GetReattestSession(ctx context.Context, id string) (ReattestSession, error)
	// EndSession deletes the row of a session that is not locked (its VM
	// was revoked or its volume erased: it is no longer waited for).
	EndSession(ctx context.Context, id string) error
	// ClaimStaleSessions flags stale at now, and returns, up to limit
	// sessions that are neither locked nor stale and whose Due is before
	// now. Of replicas claiming at once, each session goes to one.
	ClaimStaleSessions(ctx context.Context, now time.Time, limit int) ([]ReattestSession, error)
	// CountStaleSessions is how many sessions are flagged stale and not
	// locked.
	CountStaleSessions(ctx context.Context) (int, error)
	// ForgetSessions deletes the sessions locked, or flagged stale, before
	// cutoff, and returns how many.
	ForgetSessions(ctx context.Context, cutoff time.Time) (int64, error)
}

var (
	_ ServiceKeys      = (*SQLite)(nil)
	_ ServiceKeys      = (*Postgres)(nil)
	_ ReattestSessions = (*SQLite)(nil)
	_ ReattestSessions = (*Postgres)(nil)
)

// nsOrZero and timeOrZero store an unset time as 0.
func nsOrZero(t time.Time) int64 {
	if t.IsZero() {
		return 0
	}
	return t.UnixNano()
}

func timeOrZero(n int64) time.Time {
	if n == 0 {
		return time.Time{}
	}
	return fromNS(n)
}

// reattestCols are the columns scanReattest reads, in order.
const reattestCols = `id, vm, volume, interval_ns, last_ns, due_ns, locked_ns, stale_ns, mac`

func scanReattest(r rowScanner) (ReattestSession, error) {
	var (
		s                                  ReattestSession
		interval, last, due, locked, stale int64
	)
	if err := r.Scan(&s.ID, &s.VM, &s.Volume, &interval, &last, &due, &locked, &stale, &s.MAC); err != nil {
		return ReattestSession{}, err
	}
	s.Interval = time.Duration(interval)
	s.Last, s.Due, s.Locked, s.Stale = timeOrZero(last), timeOrZero(due), timeOrZero(locked), timeOrZero(stale)
	return s, nil
}

// reattestArgs are s's values for an INSERT of reattestCols.
func reattestArgs(s ReattestSession) []any {
	return []any{s.ID, s.VM, s.Volume, int64(s.Interval), nsOrZero(s.Last), nsOrZero(s.Due), nsOrZero(s.Locked), nsOrZero(s.Stale), s.MAC}
}
