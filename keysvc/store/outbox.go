package store

import (
	"context"
	"encoding/json"
	"fmt"
	"time"
)

// OutboxItem is one alert waiting for one sink: the durable half of
// at-least-once delivery (package keysvc/alert delivers it).
type OutboxItem struct {
	ID       int64  // set by the store
	Sink     string // which sink: "webhook:<url>", "syslog:<addr>"
	Key      string // idempotency key, unique per sink
	EventID  int64  // the VM event it carries
	Body     []byte // what to deliver, JSON
	Created  time.Time
	Attempts int
	Next     time.Time // not tried again before this
	LastErr  string
	Dead     bool
}

// OutboxStats counts what an outbox holds.
type OutboxStats struct {
	Pending int64 // still being tried
	Dead    int64 // given up on (dead letters)
}

// Outbox is the alert outbox. Its items survive restarts; several key
// service replicas on one database may deliver from it at once (Claim
// leases what it returns).
//
// SQLite implements it over the alert_outbox table (migration 0004),
// PostgreSQL over its own (postgres/0003): EnqueueAlerts as INSERT … ON
// CONFLICT (sink, idem_key) DO NOTHING, and ClaimAlerts as one UPDATE of
// rows picked FOR UPDATE SKIP LOCKED, so that replicas claim disjoint
// items.
type Outbox interface {
	// EnqueueAlerts stores items in one transaction (all or none). An item
	// whose (Sink, Key) is already stored is skipped, so that enqueueing
	// the same alert twice delivers it once more at most.
	EnqueueAlerts(ctx context.Context, items []OutboxItem) error
	// ClaimAlerts returns up to limit live items of the given sinks due at
	// now (Next <= now), oldest first, and moves their Next to now+lease in
	// the same transaction, so that another replica does not claim them
	// while they are being delivered.
	ClaimAlerts(ctx context.Context, sinks []string, now time.Time, lease time.Duration, limit int) ([]OutboxItem, error)
	// AlertDelivered removes a delivered item.
	AlertDelivered(ctx context.Context, id int64) error
	// AlertFailed records a failed attempt: Attempts+1, the error, and
	// the next try; with dead it stops trying (a dead letter).
	AlertFailed(ctx context.Context, id int64, errText string, next time.Time, dead bool) error
	// OutboxStats counts pending items and dead letters.
	OutboxStats(ctx context.Context) (OutboxStats, error)
}

// EventFeed reads stored VM events in the order they were stored, for the
// live event stream and its Last-Event-ID resume. IDs commit in increasing
// order on both engines (on PostgreSQL, AddEvents holds an advisory lock to
// its commit), so a stream resuming after N never skips a lower ID
// committed later.
type EventFeed interface {
	// EventsAfter returns up to limit (1 to MaxEventList) events with
	// ID > after, lowest ID first.
	EventsAfter(ctx context.Context, after int64, limit int) ([]VMEvent, error)
	// LastEventID is the highest event ID stored, 0 if none.
	LastEventID(ctx context.Context) (int64, error)
}

// checkOutboxItems refuses items EnqueueAlerts cannot store.
func checkOutboxItems(items []OutboxItem) error {
	for i, it := range items {
		switch {
		case it.Sink == "" || it.Key == "":
			return fmt.Errorf("enqueue alerts: item %d: sink and key are required", i)
		case !json.Valid(it.Body):
			return fmt.Errorf("enqueue alerts: item %d: body is not valid JSON", i)
		case it.Created.IsZero():
			return fmt.Errorf("enqueue alerts: item %d: no creation time", i)
		}
	}
	return nil
}
