package store

import (
	"context"
	"database/sql"
	"errors"
	"fmt"

	"github.com/jackc/pgx/v5"
)

// ErrTargetNotEmpty means a copy's target database already holds records.
var ErrTargetNotEmpty = errors.New("target database is not empty")

// CopyCounts says how many rows of each kind a copy moved.
type CopyCounts struct {
	VMs        int  `json:"vms"`
	Volumes    int  `json:"volumes"`
	Challenges int  `json:"used_challenges"`
	Audit      int  `json:"audit_records"`
	Events     int  `json:"vm_events"`
	Alerts     int  `json:"alert_outbox"`
	Rotations  int  `json:"volume_rotations"`
	Sessions   int  `json:"reattest_sessions"`
	Keys       int  `json:"service_keys"`
	Anchor     bool `json:"anchor"`
	MasterKey  bool `json:"master_key_check"`
}

// copyTables are the tables a copy moves, in foreign-key order, each with
// its columns (the same names in both schemas).
var copyTables = []struct {
	name, cols string
	count      func(*CopyCounts) *int
}{
	{"vms", vmColumns, func(c *CopyCounts) *int { return &c.VMs }},
	{"volumes", volumeColumns, func(c *CopyCounts) *int { return &c.Volumes }},
	{"used_challenges", "id, expires_ns", func(c *CopyCounts) *int { return &c.Challenges }},
	{"audit_log", auditColumns, func(c *CopyCounts) *int { return &c.Audit }},
	{"vm_events", "id, received_ns, vm, volume, session_id, kind, severity, severity_rank, event_json", func(c *CopyCounts) *int { return &c.Events }},
	{"alert_outbox", "id, sink, idem_key, event_id, body, created_ns, attempts, next_ns, last_error, dead", func(c *CopyCounts) *int { return &c.Alerts }},
	{"volume_rotations", rotationColumns, func(c *CopyCounts) *int { return &c.Rotations }},
	{"reattest_sessions", reattestCols, func(c *CopyCounts) *int { return &c.Sessions }},
	{"service_keys", "name, sealed", func(c *CopyCounts) *int { return &c.Keys }},
	{"store_anchor", "id, created_ns, genesis_seq, genesis_hash, mac", nil},
	{"master_key_check", "id, fingerprint, created_ns", nil},
}

// CopyToPostgres copies every record of src into dst, byte for byte (the
// audit chain, its head, the anchor and the row MACs unchanged, so that
// they verify under the same master key), in one transaction of dst: all
// of it, or nothing. src is read in one snapshot; stop the key service that
// writes it first, or later writes are not copied. dst must be empty
// (ErrTargetNotEmpty otherwise): a copy never merges two stores.
func CopyToPostgres(ctx context.Context, src *SQLite, dst *Postgres) (CopyCounts, error) {
	var counts CopyCounts
	err := src.read(ctx, func(stx *sql.Tx) error {
		return dst.tx(ctx, func(ctx context.Context, tx pgx.Tx) error {
			if _, err := tx.Exec(ctx, `LOCK TABLE audit_head, vms, volumes, used_challenges, audit_log, vm_events, alert_outbox, volume_rotations, reattest_sessions, service_keys, store_anchor, master_key_check IN EXCLUSIVE MODE`); err != nil {
				return err
			}
			var n int64
			if err := tx.QueryRow(ctx, `SELECT (SELECT count(*) FROM vms) + (SELECT count(*) FROM volumes) + (SELECT count(*) FROM used_challenges)
				+ (SELECT count(*) FROM audit_log) + (SELECT count(*) FROM vm_events) + (SELECT count(*) FROM store_anchor)
				+ (SELECT count(*) FROM master_key_check) + (SELECT count(*) FROM alert_outbox) + (SELECT count(*) FROM volume_rotations)
				+ (SELECT count(*) FROM reattest_sessions) + (SELECT count(*) FROM service_keys)
				+ (SELECT seq FROM audit_head WHERE id = 1)`).Scan(&n); err != nil {
				return err
			}
			if n != 0 {
				return fmt.Errorf("%w (it holds records of another key service, or of an earlier copy): give a new, empty database", ErrTargetNotEmpty)
			}
			for _, tb := range copyTables {
				k, err := copyTable(ctx, stx, tx, tb.name, tb.cols)
				if err != nil {
					return fmt.Errorf("copy %s: %w", tb.name, err)
				}
				switch {
				case tb.count != nil:
					*tb.count(&counts) = k
				case tb.name == "store_anchor":
					counts.Anchor = k > 0
				default:
					counts.MasterKey = k > 0
				}
			}
			var h AuditHead
			var seq int64
			err := stx.QueryRowContext(ctx, `SELECT seq, hash, mac FROM audit_head WHERE id = 1`).Scan(&seq, &h.Hash, &h.MAC)
			switch {
			case err == nil:
				h.Seq = uint64(seq)
				if err := writeHead(ctx, tx, &h); err != nil {
					return err
				}
			case !isNoRows(err):
				return fmt.Errorf("read audit head: %w", err)
			}
			// New events continue after the copied ones: IDs are never reused.
			for _, t := range []string{"vm_events", "alert_outbox"} {
				if _, err := tx.Exec(ctx, `SELECT setval(pg_get_serial_sequence('`+t+`', 'id'), COALESCE((SELECT max(id) FROM `+t+`), 0) + 1, false)`); err != nil {
					return err
				}
			}
			return nil
		})
	})
	if err != nil {
		return CopyCounts{}, fmt.Errorf("copy store to PostgreSQL: %w", err)
	}
	return counts, nil
}

// copyTable moves every row of one table with COPY.
func copyTable(ctx context.Context, stx *sql.Tx, tx pgx.Tx, table, cols string) (int, error) {
	rows, err := stx.QueryContext(ctx, `SELECT `+cols+` FROM `+table)
	if err != nil {
		return 0, err
	}
	defer rows.Close()
	names, err := rows.Columns()
	if err != nil {
		return 0, err
	}
	types, err := rows.ColumnTypes()
	if err != nil {
		return 0, err
	}
	var data [][]any
	for rows.Next() {
		vals := make([]any, len(names))
		ptrs := make([]any, len(names))
		for i := range vals {
			ptrs[i] = &vals[i]
		}
		if err := rows.Scan(ptrs...); err != nil {
			return 0, err
		}
		for i, v := range vals {
			vals[i] = toPG(table, names[i], types[i], v)
		}
		data = append(data, vals)
	}
	if err := rows.Err(); err != nil {
		return 0, err
	}
	n, err := tx.CopyFrom(ctx, pgx.Identifier{table}, names, pgx.CopyFromRows(data))
	return int(n), err
}

// toPG converts an SQLite value to its PostgreSQL column's type: the
// INTEGER 0/1 flags become booleans, TEXT stays a string, BLOB bytes.
func toPG(table, col string, _ *sql.ColumnType, v any) any {
	switch col {
	case "provisioning_allowed", "revoked", "learn_armed", "dead", "rotation_pending", "released", "cancelling":
		if n, ok := v.(int64); ok {
			return n != 0
		}
	case "id":
		if table == "store_anchor" || table == "master_key_check" {
			if n, ok := v.(int64); ok {
				return int32(n)
			}
		}
	case "severity_rank", "attempts":
		if n, ok := v.(int64); ok {
			return int32(n)
		}
	}
	return v
}
