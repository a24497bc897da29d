package store

import (
	"context"
	"database/sql"
	"embed"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	_ "modernc.org/sqlite" // registers the "sqlite" database/sql driver
)

// maxConns bounds the pool: the writer's connection, the checkpointer's,
// the pinned hot readers (hotReaders), and read transactions.
const maxConns = 8

// DBFile is the SQLite database's file name inside the data directory.
const DBFile = "keysvc.db"

//go:embed migrations/*.sql migrations/postgres/*.sql
var migrationFS embed.FS

type migration struct {
	version int
	name    string
	sql     string
}

// loadMigrations returns the embedded migrations of dir in version order.
// Files are named NNNN_name.sql, each number used once. Numbers may have
// gaps (branches reserve numbers for migrations that merge later), and a
// database gets every migration it has not recorded, so one that arrives
// with a lower number than some already applied is still applied.
func loadMigrations(dir string) ([]migration, error) {
	ents, err := fs.ReadDir(migrationFS, dir)
	if err != nil {
		return nil, err
	}
	var ms []migration
	for _, e := range ents {
		if e.IsDir() {
			continue
		}
		num, _, ok := strings.Cut(e.Name(), "_")
		v, err := strconv.Atoi(num)
		if !ok || err != nil || !strings.HasSuffix(e.Name(), ".sql") {
			return nil, fmt.Errorf("migration file %q is not named NNNN_name.sql", e.Name())
		}
		b, err := migrationFS.ReadFile(dir + "/" + e.Name())
		if err != nil {
			return nil, err
		}
		ms = append(ms, migration{version: v, name: e.Name(), sql: string(b)})
	}
	sort.Slice(ms, func(i, j int) bool { return ms[i].version < ms[j].version })
	for i, m := range ms {
		if m.version < 1 || i > 0 && m.version == ms[i-1].version {
			return nil, fmt.Errorf("migration %q: version %d is taken or below 1 (give each file its own number)", m.name, m.version)
		}
	}
	return ms, nil
}

// pending returns the migrations of ms not in applied, or ErrNewerSchema if
// applied holds a version that ms does not know: a newer keysvc (or another
// branch's) migrated the database.
func pending(ms []migration, applied map[int]bool) ([]migration, error) {
	known := map[int]bool{}
	for _, m := range ms {
		known[m.version] = true
	}
	unknown := 0
	for v := range applied {
		if !known[v] {
			unknown = max(unknown, v)
		}
	}
	if unknown > 0 {
		return nil, fmt.Errorf("%w: the database carries migration %d, which this keysvc does not know (its newest is %d): run a keysvc at least as new as the one that last used this database, or restore a backup made by this version",
			ErrNewerSchema, unknown, ms[len(ms)-1].version)
	}
	var out []migration
	for _, m := range ms {
		if !applied[m.version] {
			out = append(out, m)
		}
	}
	return out, nil
}

// SQLite is the embedded Store: one database file, DIR/keysvc.db, in WAL
// mode.
//
// Writes run in BEGIN IMMEDIATE transactions (so a read-modify-write never
// has to upgrade a read lock, which SQLite refuses under contention), issued
// by one writer goroutine per process, so concurrent writers queue in Go
// rather than spinning in SQLite's busy handler. Another process on the same
// file waits up to the busy timeout (5 s). synchronous=FULL makes every
// committed record durable, at one fsync per write transaction; the writer
// group-commits (see write) so that concurrent callers share that fsync.
//
// Crypto-erase: secure_delete is on, so SQLite zeroes freed space in the
// pages it writes, and after an erase the WAL is checkpointed and truncated.
// Copies of a sealed UK can still survive outside the database's control: in
// backups, in filesystem blocks freed by the truncation, or in SSD
// remapping. The sealed UK is encrypted under the master key, so erasing is
// final only once no copy of the master key can meet such a copy.
type SQLite struct {
	db   *sql.DB
	path string
	wmu  sync.Mutex // held by the writer for each batch, and by truncateWAL

	stmts sync.Map // query → *sql.Stmt; see prepared

	queue   chan *writeReq // see write
	qmu     sync.RWMutex   // write holds it shared while queueing; Close exclusively to set closed
	closed  bool
	stop    chan struct{} // closed by Close: the writer finishes the queue and ends
	stopped chan struct{}

	ckptDone chan struct{}

	readers  chan *readConn // see queryRow
	nReaders int            // how many readers openReaders made

	// failCommit, if set (by tests), is consulted just before each batch's
	// COMMIT; an error rolls the batch back as a failed COMMIT would.
	failCommit func(batch int) error
	// commit holds SetCommitDelay's settings; atomic, since a key service
	// may set them on a store that is already in use.
	commit atomic.Pointer[commitDelay]
}

var _ Store = (*SQLite)(nil)

// OpenSQLite opens (creating if needed) the database DIR/keysvc.db and applies
// any pending migrations. dir is created 0700 if missing, and the database
// file 0600. A database migrated by a newer keysvc is refused with
// ErrNewerSchema.
func OpenSQLite(ctx context.Context, dir string) (*SQLite, error) {
	if strings.ContainsAny(dir, "?#") {
		return nil, fmt.Errorf("open store: data directory %q contains '?' or '#' (use a path without them)", dir)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("open store: %w", err)
	}
	path := filepath.Join(dir, DBFile)
	// Create the file ourselves so that it (and the -wal and -shm files,
	// which SQLite gives the database file's mode) is 0600.
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("open store: %w", err)
	}
	f.Close()

	dsn := path + "?_txlock=immediate" +
		"&_pragma=busy_timeout(5000)" +
		"&_pragma=journal_mode(WAL)" +
		"&_pragma=synchronous(FULL)" +
		"&_pragma=foreign_keys(1)" +
		"&_pragma=secure_delete(1)" +
		"&_pragma=wal_autocheckpoint(0)" // see checkpointer
	db, err := sql.Open("sqlite", dsn)
	if err != nil {
		return nil, fmt.Errorf("open store %s: %w", path, err)
	}
	// Keep every connection open: database/sql keeps only two idle ones by
	// default, and each reopen runs the pragmas above and re-prepares the
	// cached statements (it was a twentieth of the service's CPU under
	// load).
	db.SetMaxOpenConns(maxConns)
	db.SetMaxIdleConns(maxConns)
	s := &SQLite{db: db, path: path}
	s.startWriter()
	err = s.migrate(ctx)
	if err == nil {
		err = s.openReaders(ctx)
	}
	if err != nil {
		s.Close()
		return nil, fmt.Errorf("open store %s: %w", path, err)
	}
	return s, nil
}

// Close finishes the writes already queued, refuses later ones, and closes
// the database.
func (s *SQLite) Close() error {
	s.stopWriter()
	s.closeReaders()
	s.closeStmts()
	return s.db.Close()
}

func (s *SQLite) migrate(ctx context.Context) error {
	ms, err := loadMigrations("migrations")
	if err != nil {
		return err
	}
	return s.write(ctx, func(ctx context.Context, tx *sql.Tx) error {
		if _, err := tx.ExecContext(ctx, `CREATE TABLE IF NOT EXISTS schema_migrations (
			version    INTEGER PRIMARY KEY,
			name       TEXT    NOT NULL,
			applied_ns INTEGER NOT NULL
		) STRICT`); err != nil {
			return fmt.Errorf("create schema_migrations: %w", err)
		}
		applied, err := appliedVersions(ctx, tx)
		if err != nil {
			return err
		}
		todo, err := pending(ms, applied)
		if err != nil {
			return err
		}
		for _, m := range todo {
			if _, err := tx.ExecContext(ctx, m.sql); err != nil {
				return fmt.Errorf("apply migration %s: %w", m.name, err)
			}
			if _, err := tx.ExecContext(ctx, `INSERT INTO schema_migrations (version, name, applied_ns) VALUES (?, ?, ?)`,
				m.version, m.name, time.Now().UnixNano()); err != nil {
				return fmt.Errorf("record migration %s: %w", m.name, err)
			}
		}
		return nil
	})
}

// appliedVersions reads the versions schema_migrations records.
func appliedVersions(ctx context.Context, tx *sql.Tx) (map[int]bool, error) {
	rows, err := tx.QueryContext(ctx, `SELECT version FROM schema_migrations`)
	if err != nil {
		return nil, fmt.Errorf("read schema version: %w", err)
	}
	defer rows.Close()
	applied := map[int]bool{}
	for rows.Next() {
		var v int
		if err := rows.Scan(&v); err != nil {
			return nil, fmt.Errorf("read schema version: %w", err)
		}
		applied[v] = true
	}
	return applied, rows.Err()
}

// read runs fn in a deferred (read-only) transaction: one snapshot.
func (s *SQLite) read(ctx context.Context, fn func(*sql.Tx) error) error {
	tx, err := s.db.BeginTx(ctx, &sql.TxOptions{ReadOnly: true})
	if err != nil {
		return fmt.Errorf("begin read: %w", err)
	}
	defer tx.Rollback()
	return fn(tx)
}

// truncateWAL copies the WAL into the database and truncates it, so that
// pre-erase page images do not linger in the -wal file. Best effort: an open
// reader can keep old frames; the next checkpoint then removes them.
func (s *SQLite) truncateWAL(ctx context.Context) {
	s.wmu.Lock()
	defer s.wmu.Unlock()
	s.db.ExecContext(ctx, `PRAGMA wal_checkpoint(TRUNCATE)`)
}

func ns(t time.Time) int64 { return t.UnixNano() }

func fromNS(n int64) time.Time { return time.Unix(0, n).UTC() }

// ValidID accepts the names and IDs the store keys on: 1 to 128 characters
// from A–Z a–z 0–9 . _ : -. Both stores refuse any other; the admin API
// checks with it first, so that a bad name is a 400 and not a store error.
func ValidID(kind, id string) error {
	if id == "" || len(id) > 128 {
		return fmt.Errorf("%s %q: must be 1 to 128 characters", kind, id)
	}
	for _, c := range id {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '.' || c == '_' || c == ':' || c == '-') {
			return fmt.Errorf("%s %q: may contain only letters, digits and . _ : -", kind, id)
		}
	}
	return nil
}

func isNoRows(err error) bool { return errors.Is(err, sql.ErrNoRows) }

// prepared returns query prepared on the database, once. database/sql then
// prepares it at most once per connection and reuses it (Tx.StmtContext
// finds the connection's copy), which spares SQLite's parser on the hot
// paths: statement preparation otherwise costs more than the statement.
func (s *SQLite) prepared(query string) (*sql.Stmt, error) {
	if st, ok := s.stmts.Load(query); ok {
		return st.(*sql.Stmt), nil
	}
	st, err := s.db.PrepareContext(context.Background(), query)
	if err != nil {
		return nil, err
	}
	if prev, loaded := s.stmts.LoadOrStore(query, st); loaded {
		st.Close()
		return prev.(*sql.Stmt), nil
	}
	return st, nil
}

// txExec is tx.ExecContext through the prepared-statement cache.
func (s *SQLite) txExec(ctx context.Context, tx *sql.Tx, query string, args ...any) (sql.Result, error) {
	st, err := s.prepared(query)
	if err != nil {
		return tx.ExecContext(ctx, query, args...)
	}
	return tx.StmtContext(ctx, st).ExecContext(ctx, args...)
}

// txQueryRow is tx.QueryRowContext through the prepared-statement cache.
func (s *SQLite) txQueryRow(ctx context.Context, tx *sql.Tx, query string, args ...any) *sql.Row {
	st, err := s.prepared(query)
	if err != nil {
		return tx.QueryRowContext(ctx, query, args...)
	}
	return tx.StmtContext(ctx, st).QueryRowContext(ctx, args...)
}

// closeStmts closes the cached statements.
func (s *SQLite) closeStmts() {
	s.stmts.Range(func(k, v any) bool {
		v.(*sql.Stmt).Close()
		s.stmts.Delete(k)
		return true
	})
}
