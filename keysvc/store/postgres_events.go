package store

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
)

// AddEvents implements Events.
func (p *Postgres) AddEvents(ctx context.Context, evs []VMEvent) ([]VMEvent, error) {
	out, err := checkEvents(evs)
	if err != nil {
		return nil, err
	}
	err = p.tx(ctx, func(ctx context.Context, tx pgx.Tx) error {
		// Held to the commit, so that IDs commit in the order they are
		// drawn (EventsAfter relies on it).
		if _, err := tx.Exec(ctx, `SELECT pg_advisory_xact_lock($1)`, int64(eventsLock)); err != nil {
			return err
		}
		for i := range out {
			e := &out[i]
			if err := tx.QueryRow(ctx, `INSERT INTO vm_events (received_ns, vm, volume, session_id, kind, severity, severity_rank, event_json)
				VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING id`,
				ns(e.Received), e.VM, e.Volume, e.Session, e.Kind, e.Severity, SeverityRank(e.Severity), string(e.Data)).Scan(&e.ID); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("add events: %w", err)
	}
	return out, nil
}

// ListEvents implements Events.
func (p *Postgres) ListEvents(ctx context.Context, f EventFilter) ([]VMEvent, error) {
	where, args, err := eventWhere(f)
	if err != nil {
		return nil, err
	}
	q := `SELECT ` + eventColumns + ` FROM vm_events`
	if len(where) > 0 {
		for i := range where {
			where[i] = strings.Replace(where[i], "?", "$"+strconv.Itoa(i+1), 1)
		}
		q += ` WHERE ` + strings.Join(where, " AND ")
	}
	q += ` ORDER BY id DESC LIMIT $` + strconv.Itoa(len(args))
	out, err := pgList(ctx, p, pgEvent, q, args...)
	if err != nil {
		return nil, fmt.Errorf("list events: %w", err)
	}
	return out, nil
}

// PurgeEvents implements Events.
func (p *Postgres) PurgeEvents(ctx context.Context, before time.Time) (int64, error) {
	n, err := p.pgDelete(ctx, `DELETE FROM vm_events WHERE received_ns < $1`, ns(before))
	if err != nil {
		return 0, fmt.Errorf("purge events: %w", err)
	}
	return n, nil
}
