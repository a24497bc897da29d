package store

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
)

// Postgres is the Store for several key service replicas on one PostgreSQL
// database (pgx v5, its own pool per replica).
//
// The guarantees of the package comment hold across processes:
// UpdateVM/UpdateVolume read the row with SELECT … FOR UPDATE and write it
// in the same transaction; a challenge is used with INSERT … ON CONFLICT DO
// NOTHING in the audit record's transaction; and every audit append first
// locks the audit_head row (its migration creates it), so appenders in all
// replicas take turns and the chain cannot fork. Transactions run at READ
// COMMITTED: each statement after the head's lock sees what the previous
// holder committed.
//
// Group commit: audit appends (an unlock's one durable write) queue for one
// writer goroutine per replica, which runs each batch in one transaction
// under one lock of the head, as SQLite's writer does, so that a batch pays
// for one lock hand-over and one WAL flush, in two round trips
// (commitAudit). The other writes run as their own transactions: they take
// no shared lock, and PostgreSQL already flushes the WAL of concurrent
// commits together.
//
// An unlock costs one query of its own on the way in (GetVMAndVolumeUsing:
// the VM, the volume and whether the challenge is used) and a share of its
// batch's round trips on the way out, which also re-read every VM and
// volume of the batch after the COMMIT (AppendAuditUsingThenRead). On this
// project's 2-core machines each statement and each round trip is CPU the
// replicas, PostgreSQL and the VMs' requests share.
//
// Every call is bounded: by the caller's deadline, or by callTimeout when
// the caller has none, so that an unreachable database costs a request at
// most that long. Errors that mean the database is not reachable, or not
// writable now (a standby, a server shutting down), wrap ErrUnavailable.
type Postgres struct {
	pool *pgxpool.Pool

	queue     chan *auditReq
	qmu       sync.RWMutex
	closed    bool
	stop      chan struct{}
	stopped   chan struct{}
	commit    atomic.Pointer[commitDelay]
	scanFlush sync.Mutex // see durableSnapshot
}

// callTimeout bounds a store call whose context has no deadline.
const callTimeout = 10 * time.Second

// defaultConnectTimeout is the connect timeout when the URL sets none
// (connect_timeout): a dead host in a multi-host URL costs this before the
// next is tried.
const defaultConnectTimeout = 3 * time.Second

// defaultPoolConns is each replica's pool size when the URL sets none
// (pool_max_conns).
const defaultPoolConns = 8

// migrateLock is the advisory lock key under which a replica migrates, so
// that replicas started together apply each migration once.
const migrateLock = 0x6b657967617465 // "keygate"

// OpenPostgres connects to the database url names and applies any pending
// migrations. url is a PostgreSQL connection string as libpq takes it
// (postgres://user:pass@host1:5432,host2:5432/db?target_session_attrs=read-write,
// or key=value pairs; a unix socket directory as host=/dir), plus pgx's
// pool_max_conns. A database migrated by a newer keysvc is refused with
// ErrNewerSchema.
func OpenPostgres(ctx context.Context, url string) (*Postgres, error) {
	cfg, err := pgxpool.ParseConfig(url)
	if err != nil {
		// pgx's message can echo the URL, password included.
		return nil, errors.New("open store: the PostgreSQL URL does not parse (want postgres://user@host:port/dbname?options, as libpq takes it)")
	}
	if cfg.ConnConfig.ConnectTimeout == 0 {
		cfg.ConnConfig.ConnectTimeout = defaultConnectTimeout
	}
	if _, set := cfg.ConnConfig.RuntimeParams["application_name"]; !set {
		cfg.ConnConfig.RuntimeParams["application_name"] = "keysvc"
	}
	if !hasParam(url, "pool_max_conns") {
		cfg.MaxConns = defaultPoolConns
	}
	if !hasParam(url, "pool_min_conns") {
		cfg.MinConns = cfg.MaxConns
	}
	cfg.AfterConnect = warmConn
	// pgx pings a connection idle for a second before handing it out. The
	// pool keeps all its connections now, which a database restart or
	// failover leaves dead: ping sooner, so that the first calls after a
	// short outage meet a live connection, not one 503 each. Under load a
	// connection is reused within milliseconds and never pinged.
	cfg.ShouldPing = func(_ context.Context, p pgxpool.ShouldPingParams) bool {
		return p.IdleDuration > 100*time.Millisecond
	}
	cfg.HealthCheckPeriod = 5 * time.Second
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("open store: %w", classify(err))
	}
	p := &Postgres{pool: pool}
	if err := p.migrate(ctx); err != nil {
		pool.Close()
		return nil, fmt.Errorf("open store on PostgreSQL %s: %w", where(cfg), err)
	}
	warmPool(ctx, pool, cfg.MinConns)
	p.queue = make(chan *auditReq, maxBatch)
	p.stop = make(chan struct{})
	p.stopped = make(chan struct{})
	go p.writer()
	return p, nil
}

// where names the database for errors and logs, without credentials.
func where(cfg *pgxpool.Config) string {
	c := cfg.ConnConfig
	s := c.Database + " at " + net.JoinHostPort(c.Host, strconv.Itoa(int(c.Port)))
	for _, f := range c.Fallbacks {
		s += ", " + net.JoinHostPort(f.Host, strconv.Itoa(int(f.Port)))
	}
	return s
}

func hasParam(url, name string) bool {
	return strings.Contains(url, name+"=") || strings.Contains(url, name+" =")
}

// Close finishes the audit appends already queued, refuses later writes,
// and closes the pool.
func (p *Postgres) Close() error {
	p.qmu.Lock()
	if !p.closed {
		p.closed = true
		close(p.stop)
	}
	p.qmu.Unlock()
	<-p.stopped
	p.pool.Close()
	return nil
}

func (p *Postgres) migrate(ctx context.Context) error {
	ms, err := loadMigrations("migrations/postgres")
	if err != nil {
		return err
	}
	return p.tx(ctx, func(ctx context.Context, tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, `SELECT pg_advisory_xact_lock($1)`, int64(migrateLock)); err != nil {
			return fmt.Errorf("lock for migration: %w", err)
		}
		if _, err := tx.Exec(ctx, `CREATE TABLE IF NOT EXISTS schema_migrations (
			version    integer PRIMARY KEY,
			name       text    NOT NULL,
			applied_ns bigint  NOT NULL)`); err != nil {
			return fmt.Errorf("create schema_migrations: %w", err)
		}
		vs, err := pgx.CollectRows(mustQuery(tx.Query(ctx, `SELECT version FROM schema_migrations`)), pgx.RowTo[int32])
		if err != nil {
			return fmt.Errorf("read schema version: %w", err)
		}
		applied := map[int]bool{}
		for _, v := range vs {
			applied[int(v)] = true
		}
		todo, err := pending(ms, applied)
		if err != nil {
			return err
		}
		for _, m := range todo {
			if _, err := tx.Exec(ctx, m.sql); err != nil {
				return fmt.Errorf("apply migration %s: %w", m.name, err)
			}
			if _, err := tx.Exec(ctx, `INSERT INTO schema_migrations (version, name, applied_ns) VALUES ($1, $2, $3)`,
				m.version, m.name, time.Now().UnixNano()); err != nil {
				return fmt.Errorf("record migration %s: %w", m.name, err)
			}
		}
		return nil
	})
}

// mustQuery passes a Query's rows on, or rows that report its error, so
// that CollectRows can take the pair.
func mustQuery(rows pgx.Rows, err error) pgx.Rows {
	if err != nil {
		return errRows{err: err}
	}
	return rows
}

// bound gives ctx a deadline of callTimeout if it has none.
func bound(ctx context.Context) (context.Context, context.CancelFunc) {
	if _, ok := ctx.Deadline(); ok {
		return ctx, func() {}
	}
	return context.WithTimeout(ctx, callTimeout)
}

// tx runs fn in one READ COMMITTED transaction and commits it.
func (p *Postgres) tx(ctx context.Context, fn func(context.Context, pgx.Tx) error) error {
	ctx, cancel := bound(ctx)
	defer cancel()
	tx, err := p.pool.Begin(ctx)
	if err != nil {
		return classify(err)
	}
	defer tx.Rollback(context.WithoutCancel(ctx))
	if err := fn(ctx, tx); err != nil {
		return classify(err)
	}
	return classify(tx.Commit(ctx))
}

// classify wraps err with ErrUnavailable when it means that the database
// cannot be reached or cannot take writes now; other errors pass unchanged.
func classify(err error) error {
	if err == nil || errors.Is(err, ErrUnavailable) {
		return err
	}
	var pe *pgconn.PgError
	if errors.As(err, &pe) {
		switch {
		case len(pe.Code) == 5 && pe.Code[:2] == "08", // connection exception
			pe.Code == "57P01", pe.Code == "57P02", pe.Code == "57P03", // shutting down, crash, cannot connect now
			pe.Code == "25006",                     // read-only transaction: a standby, or one just demoted
			pe.Code == "53300", pe.Code == "53000": // too many connections, insufficient resources
			return fmt.Errorf("%w: %w", ErrUnavailable, err)
		}
		return err
	}
	var ce *pgconn.ConnectError
	var ne net.Error
	if errors.As(err, &ce) || errors.As(err, &ne) || pgconn.Timeout(err) || pgconn.SafeToRetry(err) ||
		errors.Is(err, context.DeadlineExceeded) || errors.Is(err, net.ErrClosed) || isConnClosed(err) {
		return fmt.Errorf("%w: %w", ErrUnavailable, err)
	}
	return err
}

// isConnClosed reports pgx's errors for a connection that died under a
// statement (they are not net.Errors once wrapped).
func isConnClosed(err error) bool {
	for _, s := range []string{"conn closed", "unexpected EOF", "connection reset", "broken pipe"} {
		if strings.Contains(err.Error(), s) {
			return true
		}
	}
	return false
}

// errRows is Rows that holds only an error.
type errRows struct {
	pgx.Rows
	err error
}

func (r errRows) Close()     {}
func (r errRows) Err() error { return r.err }
func (r errRows) Next() bool { return false }

// SetCommitDelay implements Backend: as SQLite.SetCommitDelay, for the
// audit appends' batches.
func (p *Postgres) SetCommitDelay(d time.Duration, siblings func() int) {
	if d <= 0 || siblings == nil {
		p.commit.Store(nil)
		return
	}
	p.commit.Store(&commitDelay{d: d, siblings: siblings})
}

// Ready implements Backend.
func (p *Postgres) Ready(ctx context.Context) error {
	ctx, cancel := bound(ctx)
	defer cancel()
	ms, err := loadMigrations("migrations/postgres")
	if err != nil {
		return err
	}
	var n int
	if err := p.pool.QueryRow(ctx, `SELECT COUNT(*) FROM schema_migrations`).Scan(&n); err != nil {
		return fmt.Errorf("read schema version: %w", classify(err))
	}
	if n < len(ms) {
		return fmt.Errorf("database carries %d of %d migrations (restart keysvc to apply them)", n, len(ms))
	}
	return nil
}

// ClaimMasterKey implements Backend.
func (p *Postgres) ClaimMasterKey(ctx context.Context, fp []byte) ([]byte, error) {
	var stored []byte
	err := p.tx(ctx, func(ctx context.Context, tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, `INSERT INTO master_key_check (id, fingerprint, created_ns) VALUES (1, $1, $2) ON CONFLICT (id) DO NOTHING`,
			fp, time.Now().UnixNano()); err != nil {
			return err
		}
		return tx.QueryRow(ctx, `SELECT fingerprint FROM master_key_check WHERE id = 1`).Scan(&stored)
	})
	if err != nil {
		return nil, fmt.Errorf("master key check: %w", err)
	}
	return stored, nil
}
