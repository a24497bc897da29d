package store

import (
	"context"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
)

// ClaimServiceKey implements ServiceKeys.
func (p *Postgres) ClaimServiceKey(ctx context.Context, name string, sealed []byte) ([]byte, error) {
	var stored []byte
	err := p.tx(ctx, func(ctx context.Context, tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, `INSERT INTO service_keys (name, sealed) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING`, name, sealed); err != nil {
			return err
		}
		return tx.QueryRow(ctx, `SELECT sealed FROM service_keys WHERE name = $1`, name).Scan(&stored)
	})
	if err != nil {
		return nil, fmt.Errorf("claim service key %q: %w", name, err)
	}
	return stored, nil
}

// RekeyServiceKeys implements ServiceKeys, with the rows locked (FOR
// UPDATE) until the new sealed keys are stored.
func (p *Postgres) RekeyServiceKeys(ctx context.Context, fn func(string, []byte) ([]byte, error)) (int, error) {
	n := 0
	err := p.tx(ctx, func(ctx context.Context, tx pgx.Tx) error {
		n = 0
		type key struct {
			name   string
			sealed []byte
		}
		keys, err := pgx.CollectRows(mustQuery(tx.Query(ctx, `SELECT name, sealed FROM service_keys ORDER BY name FOR UPDATE`)),
			func(r pgx.CollectableRow) (key, error) {
				var k key
				return k, r.Scan(&k.name, &k.sealed)
			})
		if err != nil {
			return err
		}
		for _, k := range keys {
			resealed, err := fn(k.name, k.sealed)
			if err != nil {
				return err
			}
			if _, err := tx.Exec(ctx, `UPDATE service_keys SET sealed = $1 WHERE name = $2`, resealed, k.name); err != nil {
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

// ReattestSeen implements ReattestSessions: the row is locked (FOR UPDATE)
// from its read to its update, so that a lock at another replica in between
// is never overwritten.
func (p *Postgres) ReattestSeen(ctx context.Context, rs ReattestSession) (ReattestSession, error) {
	var prev ReattestSession
	var found bool
	err := p.tx(ctx, func(ctx context.Context, tx pgx.Tx) error {
		var err error
		prev, err = scanReattest(tx.QueryRow(ctx, `SELECT `+reattestCols+` FROM reattest_sessions WHERE id = $1 FOR UPDATE`, rs.ID))
		switch found = err == nil; {
		case isNoRowsPG(err):
			rs.Locked, rs.Stale = time.Time{}, time.Time{}
			// A lock inserted meanwhile by another replica wins.
			_, err = tx.Exec(ctx, `INSERT INTO reattest_sessions (`+reattestCols+`) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
				ON CONFLICT (id) DO NOTHING`, reattestArgs(rs)...)
			return err
		case err != nil:
			return err
		case prev.IsLocked():
			return nil
		}
		_, err = tx.Exec(ctx, `UPDATE reattest_sessions SET interval_ns = $1, last_ns = $2, due_ns = $3, stale_ns = 0 WHERE id = $4`,
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
func (p *Postgres) LockSession(ctx context.Context, rs ReattestSession) error {
	if !rs.IsLocked() {
		return fmt.Errorf("lock session %q: no lock time", rs.ID)
	}
	err := p.tx(ctx, func(ctx context.Context, tx pgx.Tx) error {
		_, err := tx.Exec(ctx, `INSERT INTO reattest_sessions (`+reattestCols+`) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
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
func (p *Postgres) GetReattestSession(ctx context.Context, id string) (ReattestSession, error) {
	ctx, cancel := bound(ctx)
	defer cancel()
	rs, err := scanReattest(p.pool.QueryRow(ctx, `SELECT `+reattestCols+` FROM reattest_sessions WHERE id = $1`, id))
	if isNoRowsPG(err) {
		return ReattestSession{}, fmt.Errorf("session %q: %w", id, ErrNotFound)
	}
	if err != nil {
		return ReattestSession{}, fmt.Errorf("get session %q: %w", id, classify(err))
	}
	return rs, nil
}

// EndSession implements ReattestSessions.
func (p *Postgres) EndSession(ctx context.Context, id string) error {
	err := p.tx(ctx, func(ctx context.Context, tx pgx.Tx) error {
		_, err := tx.Exec(ctx, `DELETE FROM reattest_sessions WHERE id = $1 AND locked_ns = 0`, id)
		return err
	})
	if err != nil {
		return fmt.Errorf("end session %q: %w", id, err)
	}
	return nil
}

// ClaimStaleSessions implements ReattestSessions. Under READ COMMITTED, FOR
// UPDATE re-checks the WHERE on a row another replica updated meanwhile
// (then stale, so left out), and SKIP LOCKED passes over rows another
// replica is claiming now: no session is flagged twice.
func (p *Postgres) ClaimStaleSessions(ctx context.Context, now time.Time, limit int) ([]ReattestSession, error) {
	var out []ReattestSession
	err := p.tx(ctx, func(ctx context.Context, tx pgx.Tx) error {
		var err error
		out, err = pgx.CollectRows(mustQuery(tx.Query(ctx, `UPDATE reattest_sessions SET stale_ns = $1
			WHERE id IN (SELECT id FROM reattest_sessions WHERE locked_ns = 0 AND stale_ns = 0 AND due_ns < $1 ORDER BY due_ns LIMIT $2 FOR UPDATE SKIP LOCKED)
			RETURNING `+reattestCols, now.UnixNano(), limit)),
			func(r pgx.CollectableRow) (ReattestSession, error) { return scanReattest(r) })
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("claim stale sessions: %w", err)
	}
	return out, nil
}

// CountStaleSessions implements ReattestSessions.
func (p *Postgres) CountStaleSessions(ctx context.Context) (int, error) {
	ctx, cancel := bound(ctx)
	defer cancel()
	var n int
	if err := p.pool.QueryRow(ctx, `SELECT COUNT(*) FROM reattest_sessions WHERE stale_ns != 0 AND locked_ns = 0`).Scan(&n); err != nil {
		return 0, fmt.Errorf("count stale sessions: %w", classify(err))
	}
	return n, nil
}

// ForgetSessions implements ReattestSessions.
func (p *Postgres) ForgetSessions(ctx context.Context, cutoff time.Time) (int64, error) {
	var n int64
	err := p.tx(ctx, func(ctx context.Context, tx pgx.Tx) error {
		tag, err := tx.Exec(ctx, `DELETE FROM reattest_sessions WHERE (locked_ns != 0 AND locked_ns < $1) OR (locked_ns = 0 AND stale_ns != 0 AND stale_ns < $1)`,
			cutoff.UnixNano())
		n = tag.RowsAffected()
		return err
	})
	if err != nil {
		return 0, fmt.Errorf("forget sessions: %w", err)
	}
	return n, nil
}
