package store

import (
	"context"
	"database/sql"
	"encoding/json"
	"fmt"
	"strings"
	"time"
)

const eventColumns = `id, received_ns, vm, volume, session_id, kind, severity, event_json`

// AddEvents implements Events.
func (s *SQLite) AddEvents(ctx context.Context, evs []VMEvent) ([]VMEvent, error) {
	out, err := checkEvents(evs)
	if err != nil {
		return nil, err
	}
	err = s.write(ctx, func(ctx context.Context, tx *sql.Tx) error {
		for i := range out {
			e := &out[i]
			res, err := s.txExec(ctx, tx, `INSERT INTO vm_events (received_ns, vm, volume, session_id, kind, severity, severity_rank, event_json)
				VALUES (?, ?, ?, ?, ?, ?, ?, ?)`,
				ns(e.Received), e.VM, e.Volume, e.Session, e.Kind, e.Severity, SeverityRank(e.Severity), string(e.Data))
			if err != nil {
				return err
			}
			if e.ID, err = res.LastInsertId(); err != nil {
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
func (s *SQLite) ListEvents(ctx context.Context, f EventFilter) ([]VMEvent, error) {
	where, args, err := eventWhere(f)
	if err != nil {
		return nil, err
	}
	q := `SELECT ` + eventColumns + ` FROM vm_events`
	if len(where) > 0 {
		q += ` WHERE ` + strings.Join(where, " AND ")
	}
	q += ` ORDER BY id DESC LIMIT ?`
	rows, err := s.db.QueryContext(ctx, q, args...)
	if err != nil {
		return nil, fmt.Errorf("list events: %w", err)
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
			return nil, fmt.Errorf("list events: %w", err)
		}
		e.Received, e.Data = fromNS(rcv), []byte(data)
		out = append(out, e)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("list events: %w", err)
	}
	return out, nil
}

// checkEvents validates evs for AddEvents and returns a copy without IDs.
func checkEvents(evs []VMEvent) ([]VMEvent, error) {
	out := make([]VMEvent, len(evs))
	for i, e := range evs {
		switch {
		case e.VM == "" || e.Kind == "":
			return nil, fmt.Errorf("add events: event %d: vm and kind are required", i)
		case SeverityRank(e.Severity) < 0:
			return nil, fmt.Errorf("add events: event %d: severity %q is not one of %s", i, e.Severity, strings.Join(Severities, ", "))
		case e.Received.IsZero():
			return nil, fmt.Errorf("add events: event %d: no receive time", i)
		case !json.Valid(e.Data):
			return nil, fmt.Errorf("add events: event %d: data is not valid JSON", i)
		}
		out[i] = e
		out[i].ID = 0
	}
	return out, nil
}

// eventWhere turns f into WHERE terms with ? placeholders and their
// arguments, the limit last.
func eventWhere(f EventFilter) (where []string, args []any, err error) {
	if f.Limit < 0 || f.Limit > MaxEventList {
		return nil, nil, fmt.Errorf("list events: limit %d is not between 1 and %d", f.Limit, MaxEventList)
	}
	if f.Limit == 0 {
		f.Limit = MaxEventList
	}
	if f.VM != "" {
		where, args = append(where, "vm = ?"), append(args, f.VM)
	}
	if f.Kind != "" {
		where, args = append(where, "kind = ?"), append(args, f.Kind)
	}
	if !f.Since.IsZero() {
		where, args = append(where, "received_ns >= ?"), append(args, ns(f.Since))
	}
	if f.MinSeverity != "" {
		r := SeverityRank(f.MinSeverity)
		if r < 0 {
			return nil, nil, fmt.Errorf("list events: severity %q is not one of %s", f.MinSeverity, strings.Join(Severities, ", "))
		}
		where, args = append(where, "severity_rank >= ?"), append(args, r)
	}
	return where, append(args, f.Limit), nil
}

// PurgeEvents implements Events.
func (s *SQLite) PurgeEvents(ctx context.Context, before time.Time) (int64, error) {
	var n int64
	err := s.write(ctx, func(ctx context.Context, tx *sql.Tx) error {
		res, err := tx.ExecContext(ctx, `DELETE FROM vm_events WHERE received_ns < ?`, ns(before))
		if err != nil {
			return err
		}
		n, err = res.RowsAffected()
		return err
	})
	if err != nil {
		return 0, fmt.Errorf("purge events: %w", err)
	}
	return n, nil
}
