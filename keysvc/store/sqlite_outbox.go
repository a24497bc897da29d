package store

import (
	"context"
	"database/sql"
	"encoding/json"
	"fmt"
	"strings"
	"time"
	"unicode/utf8"
)

var (
	_ Outbox    = (*SQLite)(nil)
	_ EventFeed = (*SQLite)(nil)
)

// maxOutboxError bounds the last error an outbox row keeps.
const maxOutboxError = 512

// EnqueueAlerts implements Outbox.
func (s *SQLite) EnqueueAlerts(ctx context.Context, items []OutboxItem) error {
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
	if len(items) == 0 {
		return nil
	}
	err := s.write(ctx, func(ctx context.Context, tx *sql.Tx) error {
		for _, it := range items {
			next := it.Next
			if next.IsZero() {
				next = it.Created
			}
			if _, err := s.txExec(ctx, tx, `INSERT INTO alert_outbox (sink, idem_key, event_id, body, created_ns, next_ns)
				VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (sink, idem_key) DO NOTHING`,
				it.Sink, it.Key, it.EventID, it.Body, ns(it.Created), ns(next)); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("enqueue alerts: %w", err)
	}
	return nil
}

// ClaimAlerts implements Outbox.
func (s *SQLite) ClaimAlerts(ctx context.Context, sinks []string, now time.Time, lease time.Duration, limit int) ([]OutboxItem, error) {
	if len(sinks) == 0 || limit <= 0 {
		return nil, nil
	}
	if lease <= 0 {
		return nil, fmt.Errorf("claim alerts: lease %v is not positive", lease)
	}
	args := []any{ns(now)}
	for _, sk := range sinks {
		args = append(args, sk)
	}
	args = append(args, limit)
	q := `SELECT id, sink, idem_key, event_id, body, created_ns, attempts, next_ns, last_error FROM alert_outbox
		WHERE dead = 0 AND next_ns <= ? AND sink IN (?` + strings.Repeat(", ?", len(sinks)-1) + `) ORDER BY next_ns, id LIMIT ?`
	var out []OutboxItem
	err := s.write(ctx, func(ctx context.Context, tx *sql.Tx) error {
		out = out[:0]
		rows, err := tx.QueryContext(ctx, q, args...)
		if err != nil {
			return err
		}
		for rows.Next() {
			var (
				it        OutboxItem
				cns, nxns int64
			)
			if err := rows.Scan(&it.ID, &it.Sink, &it.Key, &it.EventID, &it.Body, &cns, &it.Attempts, &nxns, &it.LastErr); err != nil {
				rows.Close()
				return err
			}
			it.Created, it.Next = fromNS(cns), fromNS(nxns)
			out = append(out, it)
		}
		if err := rows.Close(); err != nil {
			return err
		}
		if err := rows.Err(); err != nil {
			return err
		}
		for _, it := range out {
			if _, err := s.txExec(ctx, tx, `UPDATE alert_outbox SET next_ns = ? WHERE id = ?`, ns(now.Add(lease)), it.ID); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("claim alerts: %w", err)
	}
	return out, nil
}

// AlertDelivered implements Outbox.
func (s *SQLite) AlertDelivered(ctx context.Context, id int64) error {
	err := s.write(ctx, func(ctx context.Context, tx *sql.Tx) error {
		_, err := s.txExec(ctx, tx, `DELETE FROM alert_outbox WHERE id = ?`, id)
		return err
	})
	if err != nil {
		return fmt.Errorf("alert %d delivered: %w", id, err)
	}
	return nil
}

// AlertFailed implements Outbox.
func (s *SQLite) AlertFailed(ctx context.Context, id int64, errText string, next time.Time, dead bool) error {
	errText = truncateUTF8(errText, maxOutboxError)
	d := 0
	if dead {
		d = 1
	}
	err := s.write(ctx, func(ctx context.Context, tx *sql.Tx) error {
		res, err := s.txExec(ctx, tx, `UPDATE alert_outbox SET attempts = attempts + 1, last_error = ?, next_ns = ?, dead = ? WHERE id = ?`,
			errText, ns(next), d, id)
		if err != nil {
			return err
		}
		if n, err := res.RowsAffected(); err != nil {
			return err
		} else if n == 0 {
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
func (s *SQLite) OutboxStats(ctx context.Context) (OutboxStats, error) {
	var st OutboxStats
	err := s.db.QueryRowContext(ctx, `SELECT COALESCE(SUM(dead = 0), 0), COALESCE(SUM(dead = 1), 0) FROM alert_outbox`).Scan(&st.Pending, &st.Dead)
	if err != nil {
		return st, fmt.Errorf("outbox stats: %w", err)
	}
	return st, nil
}

// EventsAfter implements EventFeed.
func (s *SQLite) EventsAfter(ctx context.Context, after int64, limit int) ([]VMEvent, error) {
	if limit < 1 || limit > MaxEventList {
		return nil, fmt.Errorf("events after %d: limit %d is not between 1 and %d", after, limit, MaxEventList)
	}
	rows, err := s.db.QueryContext(ctx, `SELECT `+eventColumns+` FROM vm_events WHERE id > ? ORDER BY id LIMIT ?`, after, limit)
	if err != nil {
		return nil, fmt.Errorf("events after %d: %w", after, err)
	}
	defer rows.Close()
	var out []VMEvent
	for rows.Next() {
		var (
			e    VMEvent
			rcv  int64
			data string
		)
		if err := rows.Scan(&e.ID, &rcv, &e.VM, &e.Volume, &e.Session, &e.Kind, &e.Severity, &data); err != nil {
			return nil, fmt.Errorf("events after %d: %w", after, err)
		}
		e.Received, e.Data = fromNS(rcv), []byte(data)
		out = append(out, e)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("events after %d: %w", after, err)
	}
	return out, nil
}

// LastEventID implements EventFeed.
func (s *SQLite) LastEventID(ctx context.Context) (int64, error) {
	var id int64
	if err := s.db.QueryRowContext(ctx, `SELECT COALESCE(MAX(id), 0) FROM vm_events`).Scan(&id); err != nil {
		return 0, fmt.Errorf("last event id: %w", err)
	}
	return id, nil
}

// truncateUTF8 cuts s to at most n bytes on a rune boundary.
func truncateUTF8(s string, n int) string {
	if len(s) <= n {
		return s
	}
	s = s[:n]
	for len(s) > 0 && !utf8.ValidString(s) {
		s = s[:len(s)-1]
	}
	return s
}
