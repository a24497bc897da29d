package store

import (
	"context"
	"database/sql"
	"fmt"
	"time"
)

// ClaimServiceKey implements ServiceKeys.
func (s *SQLite) ClaimServiceKey(ctx context.Context, name string, sealed []byte) ([]byte, error) {
	var stored []byte
	err := s.write(ctx, func(ctx context.Context, tx *sql.Tx) error {
		if _, err := tx.ExecContext(ctx, `INSERT INTO service_keys (name, sealed) VALUES (?, ?) ON CONFLICT (name) DO NOTHING`, name, sealed); err != nil {
			return err
		}
		return tx.QueryRowContext(ctx, `SELECT sealed FROM service_keys WHERE name = ?`, name).Scan(&stored)
	})
	if err != nil {
		return nil, fmt.Errorf("claim service key %q: %w", name, err)
	}
	return stored, nil
}

// RekeyServiceKeys implements ServiceKeys.
func (s *SQLite) RekeyServiceKeys(ctx context.Context, fn func(string, []byte) ([]byte, error)) (int, error) {
	n := 0
	err := s.write(ctx, func(ctx context.Context, tx *sql.Tx) error {
		n = 0
		rows, err := tx.QueryContext(ctx, `SELECT name, sealed FROM service_keys ORDER BY name`)
		if err != nil {
			return err
		}
		keys := map[string][]byte{}
		for rows.Next() {
			var (
				name   string
				sealed []byte
			)
			if err := rows.Scan(&name, &sealed); err != nil {
				rows.Close()
				return err
			}
			keys[name] = sealed
		}
		rows.Close()
		if err := rows.Err(); err != nil {
			return err
		}
		for name, sealed := range keys {
			resealed, err := fn(name, sealed)
			if err != nil {
				return err
			}
			if _, err := tx.ExecContext(ctx, `UPDATE service_keys SET sealed = ? WHERE name = ?`, resealed, name); err != nil {
				return err
			}
			n++
		}
		return nil
	})
	if err != nil {
		return 0, fmt.Errorf("rekey service keys: %w", err)
	}
	return n, nil
}

// ReattestSeen implements ReattestSessions.
func (s *SQLite) ReattestSeen(ctx context.Context, rs ReattestSession) (ReattestSession, error) {
	var prev ReattestSession
	var found bool
	err := s.write(ctx, func(ctx context.Context, tx *sql.Tx) error {
		var err error
		prev, err = scanReattest(tx.QueryRowContext(ctx, `SELECT `+reattestCols+` FROM reattest_sessions WHERE id = ?`, rs.ID))
		switch found = err == nil; {
		case isNoRows(err):
			rs.Locked, rs.Stale = time.Time{}, time.Time{}
			_, err = tx.ExecContext(ctx, `INSERT INTO reattest_sessions (`+reattestCols+`) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)`, reattestArgs(rs)...)
			return err
		case err != nil:
			return err
		case prev.IsLocked():
			return nil
		}
		_, err = tx.ExecContext(ctx, `UPDATE reattest_sessions SET interval_ns = ?, last_ns = ?, due_ns = ?, stale_ns = 0 WHERE id = ?`,
			int64(rs.Interval), nsOrZero(rs.Last), nsOrZero(rs.Due), rs.ID)
		return err
	})
	if err != nil {
		return ReattestSession{}, fmt.Errorf("record re-attestation of session %q: %w", rs.ID, err)
	}
	if !found {
		return ReattestSession{}, fmt.Errorf("session %q: %w", rs.ID, ErrNotFound)
	}
	return prev, nil
}

// LockSession implements ReattestSessions.
func (s *SQLite) LockSession(ctx context.Context, rs ReattestSession) error {
	if !rs.IsLocked() {
		return fmt.Errorf("lock session %q: no lock time", rs.ID)
	}
	err := s.write(ctx, func(ctx context.Context, tx *sql.Tx) error {
		_, err := tx.ExecContext(ctx, `INSERT INTO reattest_sessions (`+reattestCols+`) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
			ON CONFLICT (id) DO UPDATE SET vm = excluded.vm, volume = excluded.volume, locked_ns = excluded.locked_ns, mac = excluded.mac
			WHERE reattest_sessions.locked_ns = 0`, reattestArgs(rs)...)
		return err
	})
	if err != nil {
		return fmt.Errorf("lock session %q: %w", rs.ID, err)
	}
	return nil
}

// GetReattestSession implements ReattestSessions.
func (s *SQLite) GetReattestSession(ctx context.Context, id string) (ReattestSession, error) {
	rs, err := scanReattest(s.queryRow(ctx, `SELECT `+reattestCols+` FROM reattest_sessions WHERE id = ?`, id))
	if isNoRows(err) {
		return ReattestSession{}, fmt.Errorf("session %q: %w", id, ErrNotFound)
	}
	if err != nil {
		return ReattestSession{}, fmt.Errorf("get session %q: %w", id, err)
	}
	return rs, nil
}

// EndSession implements ReattestSessions.
func (s *SQLite) EndSession(ctx context.Context, id string) error {
	err := s.write(ctx, func(ctx context.Context, tx *sql.Tx) error {
		_, err := tx.ExecContext(ctx, `DELETE FROM reattest_sessions WHERE id = ? AND locked_ns = 0`, id)
		return err
	})
	if err != nil {
		return fmt.Errorf("end session %q: %w", id, err)
	}
	return nil
}

// ClaimStaleSessions implements ReattestSessions. SQLite has one writer:
// the UPDATE's WHERE is evaluated in the only write transaction.
func (s *SQLite) ClaimStaleSessions(ctx context.Context, now time.Time, limit int) ([]ReattestSession, error) {
	var out []ReattestSession
	err := s.write(ctx, func(ctx context.Context, tx *sql.Tx) error {
		out = nil
		rows, err := tx.QueryContext(ctx, `UPDATE reattest_sessions SET stale_ns = ?
			WHERE id IN (SELECT id FROM reattest_sessions WHERE locked_ns = 0 AND stale_ns = 0 AND due_ns < ? ORDER BY due_ns LIMIT ?)
			RETURNING `+reattestCols, now.UnixNano(), now.UnixNano(), limit)
		if err != nil {
			return err
		}
		defer rows.Close()
		for rows.Next() {
			rs, err := scanReattest(rows)
			if err != nil {
				return err
			}
			out = append(out, rs)
		}
		return rows.Err()
	})
	if err != nil {
		return nil, fmt.Errorf("claim stale sessions: %w", err)
	}
	return out, nil
}

// CountStaleSessions implements ReattestSessions.
func (s *SQLite) CountStaleSessions(ctx context.Context) (int, error) {
	var n int
	if err := s.queryRow(ctx, `SELECT COUNT(*) FROM reattest_sessions WHERE stale_ns != 0 AND locked_ns = 0`).Scan(&n); err != nil {
		return 0, fmt.Errorf("count stale sessions: %w", err)
	}
	return n, nil
}

// ForgetSessions implements ReattestSessions.
func (s *SQLite) ForgetSessions(ctx context.Context, cutoff time.Time) (int64, error) {
	var n int64
	err := s.write(ctx, func(ctx context.Context, tx *sql.Tx) error {
		r, err := tx.ExecContext(ctx, `DELETE FROM reattest_sessions WHERE (locked_ns != 0 AND locked_ns < ?) OR (locked_ns = 0 AND stale_ns != 0 AND stale_ns < ?)`,
			cutoff.UnixNano(), cutoff.UnixNano())
		if err != nil {
			return err
		}
		n, err = r.RowsAffected()
		return err
	})
	if err != nil {
		return 0, fmt.Errorf("forget sessions: %w", err)
	}
	return n, nil
}
