package store

import (
	"context"
	"fmt"
	"slices"
	"time"

	"github.com/jackc/pgx/v5"
)

var (
	_ Outbox    = (*Postgres)(nil)
	_ EventFeed = (*Postgres)(nil)
)

// eventsLock is the advisory lock key AddEvents holds until its commit:
// vm_events IDs come from a sequence, and two transactions that drew IDs
// could commit in the other order, so that a live stream resuming after
// the higher ID would never see the lower one. Under the lock, IDs are
// drawn and committed in one order. Events are written once per monitor
// report, far off the unlock path, so the turn-taking costs little.
const eventsLock = 0x6b6576656e7473 // "kevents"

// EnqueueAlerts implements Outbox, in one transaction.
func (p *Postgres) EnqueueAlerts(ctx context.Context, items []OutboxItem) error {
	if err := checkOutboxItems(items); err != nil {
		return err
	}
	if len(items) == 0 {
		return nil
	}
	err := p.tx(ctx, func(ctx context.Context, tx pgx.Tx) error {
		b := &pgx.Batch{}
		for _, it := range items {
			next := it.Next
			if next.IsZero() {
				next = it.Created
			}
			b.Queue(`INSERT INTO alert_outbox (sink, idem_key, event_id, body, created_ns, next_ns)
				VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (sink, idem_key) DO NOTHING`,
				it.Sink, it.Key, it.EventID, it.Body, ns(it.Created), ns(next))
		}
		return tx.SendBatch(ctx, b).Close()
	})
	if err != nil {
		return fmt.Errorf("enqueue alerts: %w", err)
	}
	return nil
}

// ClaimAlerts implements Outbox in one statement: the rows it picks are
// locked FOR UPDATE SKIP LOCKED, so that a replica claiming at the same
// time passes over them (and takes others) instead of waiting and then
// handing out the same rows; their lease is set before the locks go.
func (p *Postgres) ClaimAlerts(ctx context.Context, sinks []string, now time.Time, lease time.Duration, limit int) ([]OutboxItem, error) {
	if len(sinks) == 0 || limit <= 0 {
		return nil, nil
	}
	if lease <= 0 {
		return nil, fmt.Errorf("claim alerts: lease %v is not positive", lease)
	}
	var out []OutboxItem
	err := p.tx(ctx, func(ctx context.Context, tx pgx.Tx) error {
		rows, err := tx.Query(ctx, `WITH due AS (
				SELECT id, next_ns FROM alert_outbox
				WHERE NOT dead AND next_ns <= $1 AND sink = ANY($2)
				ORDER BY next_ns, id LIMIT $3 FOR UPDATE SKIP LOCKED)
			UPDATE alert_outbox o SET next_ns = $4 FROM due WHERE o.id = due.id
			RETURNING o.id, o.sink, o.idem_key, o.event_id, o.body, o.created_ns, o.attempts, due.next_ns, o.last_error`,
			ns(now), sinks, limit, ns(now.Add(lease)))
		if err != nil {
			return err
		}
		out, err = pgx.CollectRows(rows, func(r pgx.CollectableRow) (OutboxItem, error) {
			var (
				it        OutboxItem
				cns, nxns int64
			)
			err := r.Scan(&it.ID, &it.Sink, &it.Key, &it.EventID, &it.Body, &cns, &it.Attempts, &nxns, &it.LastErr)
			it.Created, it.Next = fromNS(cns), fromNS(nxns)
			return it, err
		})
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("claim alerts: %w", err)
	}
	// RETURNING keeps no order: oldest first, as SQLite's.
	slices.SortFunc(out, func(a, b OutboxItem) int {
		if c := a.Next.Compare(b.Next); c != 0 {
			return c
		}
		return int(min(max(a.ID-b.ID, -1), 1))
	})
	return out, nil
}

// AlertDelivered implements Outbox.
func (p *Postgres) AlertDelivered(ctx context.Context, id int64) error {
	if _, err := p.pgDelete(ctx, `DELETE FROM alert_outbox WHERE id = $1`, id); err != nil {
		return fmt.Errorf("alert %d delivered: %w", id, err)
	}
	return nil
}

// AlertFailed implements Outbox.
func (p *Postgres) AlertFailed(ctx context.Context, id int64, errText string, next time.Time, dead bool) error {
	errText = truncateUTF8(errText, maxOutboxError)
	err := p.tx(ctx, func(ctx context.Context, tx pgx.Tx) error {
		tag, err := tx.Exec(ctx, `UPDATE alert_outbox SET attempts = attempts + 1, last_error = $1, next_ns = $2, dead = $3 WHERE id = $4`,
			errText, ns(next), dead, id)
		if err != nil {
			return err
		}
		if tag.RowsAffected() == 0 {
			return ErrNotFound
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("alert %d failed: %w", id, err)
	}
	return nil
}

// OutboxStats implements Outbox.
func (p *Postgres) OutboxStats(ctx context.Context) (OutboxStats, error) {
	ctx, cancel := bound(ctx)
	defer cancel()
	var st OutboxStats
	err := p.pool.QueryRow(ctx, `SELECT COUNT(*) FILTER (WHERE NOT dead), COUNT(*) FILTER (WHERE dead) FROM alert_outbox`).Scan(&st.Pending, &st.Dead)
	if err != nil {
		return st, fmt.Errorf("outbox stats: %w", classify(err))
	}
	return st, nil
}

// EventsAfter implements EventFeed. IDs commit in order (eventsLock), so
// an event with an ID at or below one read here is never committed later.
func (p *Postgres) EventsAfter(ctx context.Context, after int64, limit int) ([]VMEvent, error) {
	if limit < 1 || limit > MaxEventList {
		return nil, fmt.Errorf("events after %d: limit %d is not between 1 and %d", after, limit, MaxEventList)
	}
	out, err := pgList(ctx, p, pgEvent, `SELECT `+eventColumns+` FROM vm_events WHERE id > $1 ORDER BY id LIMIT $2`, after, limit)
	if err != nil {
		return nil, fmt.Errorf("events after %d: %w", after, err)
	}
	return out, nil
}

// pgEvent scans a row of eventColumns.
func pgEvent(r pgx.Row) (VMEvent, error) {
	var (
		e    VMEvent
		rcv  int64
		data string
	)
	err := r.Scan(&e.ID, &rcv, &e.VM, &e.Volume, &e.Session, &e.Kind, &e.Severity, &data)
	e.Received, e.Data = fromNS(rcv), []byte(data)
	return e, err
}

// LastEventID implements EventFeed.
func (p *Postgres) LastEventID(ctx context.Context) (int64, error) {
	ctx, cancel := bound(ctx)
	defer cancel()
	var id int64
	if err := p.pool.QueryRow(ctx, `SELECT COALESCE(MAX(id), 0) FROM vm_events`).Scan(&id); err != nil {
		return 0, fmt.Errorf("last event id: %w", classify(err))
	}
	return id, nil
}
