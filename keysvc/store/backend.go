package store

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"strings"
	"time"
)

// ErrUnavailable means the database could not be reached or answered that
// it cannot take the request now (down, restarting, failing over, read
// only). The request may succeed if retried later; the key service answers
// it with 503 and Retry-After.
var ErrUnavailable = errors.New("database unavailable")

// ErrMasterKeyMismatch means the database was first used with another
// master key than the one given to ClaimMasterKey.
var ErrMasterKeyMismatch = errors.New("the database was first used with a different master key")

// Backend is a Store with everything else the key service needs from its
// database: the genesis anchor and adoption (rowauth), the joined read of
// the unlock path, the group commit's delay, the master key check, and
// readiness. *SQLite and *Postgres implement it.
type Backend interface {
	Store
	MasterKeyRotations
	Outbox
	EventFeed
	Rotations
	ServiceKeys
	ReattestSessions
	Anchor(ctx context.Context) (*Anchor, error)
	Adopt(ctx context.Context, vm func(*VM) error, vol func(*Volume) error, next AuditNext, anchor func(AuditRecord) Anchor) error
	GetVMAndVolume(ctx context.Context, vm, id string) (VM, *Volume, error)
	// GetVMAndVolumeUsing is GetVMAndVolume that also reports whether
	// challenge is recorded as used, in the same query: an unlock's first
	// read, one round trip where it was two.
	GetVMAndVolumeUsing(ctx context.Context, vm, id, challenge string) (VM, *Volume, bool, error)
	// AppendAuditUsingThenRead is AppendAuditUsing followed by
	// GetVMAndVolume(vm, id), read once the record is committed, so that
	// it sees every write committed before the record: an unlock's release
	// record and its re-check, in one round trip where the store can. A
	// failed read after a committed record is an error wrapping
	// ErrReadAfterAppend.
	AppendAuditUsingThenRead(ctx context.Context, use ChallengeUse, next AuditNext, vm, id string) (VM, *Volume, error)
	SetCommitDelay(d time.Duration, siblings func() int)
	// ClaimMasterKey records fp as the master key's fingerprint if the
	// database has none, and returns the one it has (fp, if it was just
	// recorded). The caller compares them. FinishMasterKeyRotation
	// replaces it with the rotation's NewKey, so fp is a
	// masterkey.Fingerprint, as the rotation row's are.
	ClaimMasterKey(ctx context.Context, fp []byte) ([]byte, error)
	// Ready reports whether the database answers and carries every
	// migration this keysvc knows (ErrUnavailable wrapped if it does not
	// answer).
	Ready(ctx context.Context) error
}

var (
	_ Backend = (*SQLite)(nil)
	_ Backend = (*Postgres)(nil)
)

// IsPostgresURL reports whether db names a PostgreSQL database: a
// postgres:// or postgresql:// URL, as libpq takes them.
func IsPostgresURL(db string) bool {
	return strings.HasPrefix(db, "postgres://") || strings.HasPrefix(db, "postgresql://")
}

// Open opens the store db names: "" or "sqlite" for dir/keysvc.db, or a
// PostgreSQL URL.
func Open(ctx context.Context, db, dir string) (Backend, error) {
	switch {
	case db == "" || db == "sqlite":
		return OpenSQLite(ctx, dir)
	case IsPostgresURL(db):
		return OpenPostgres(ctx, db)
	default:
		return nil, fmt.Errorf("open store: unknown database %q: use sqlite (DIR/keysvc.db) or a postgres://user@host/dbname URL", db)
	}
}

// ClaimMasterKey implements Backend.
func (s *SQLite) ClaimMasterKey(ctx context.Context, fp []byte) ([]byte, error) {
	var stored []byte
	err := s.write(ctx, func(ctx context.Context, tx *sql.Tx) error {
		if _, err := tx.ExecContext(ctx, `INSERT INTO master_key_check (id, fingerprint, created_ns) VALUES (1, ?, ?) ON CONFLICT (id) DO NOTHING`,
			fp, time.Now().UnixNano()); err != nil {
			return err
		}
		return tx.QueryRowContext(ctx, `SELECT fingerprint FROM master_key_check WHERE id = 1`).Scan(&stored)
	})
	if err != nil {
		return nil, fmt.Errorf("master key check: %w", err)
	}
	return stored, nil
}

// Ready implements Backend.
func (s *SQLite) Ready(ctx context.Context) error {
	ms, err := loadMigrations("migrations")
	if err != nil {
		return err
	}
	var n int
	if err := s.queryRow(ctx, `SELECT COUNT(*) FROM schema_migrations`).Scan(&n); err != nil {
		return fmt.Errorf("read schema version: %w", err)
	}
	if n < len(ms) {
		return fmt.Errorf("database carries %d of %d migrations (restart keysvc to apply them)", n, len(ms))
	}
	return nil
}
