package pgtest_test

import (
	"context"
	"os"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5"

	"github.com/keygate/keygate/internal/pgtest"
)

func TestMain(m *testing.M) { os.Exit(pgtest.Main(m)) }

// TestCluster: a private server takes connections on its socket only, each
// NewDB is a fresh database, and a stopped server refuses connections until
// it is started again, with committed data intact.
func TestCluster(t *testing.T) {
	ctx := context.Background()
	c := pgtest.New(t, pgtest.Options{})
	u1, u2 := c.NewDB(t), c.NewDB(t)
	if u1 == u2 {
		t.Fatalf("NewDB gave %s twice", u1)
	}
	conn, err := pgx.Connect(ctx, u1)
	if err != nil {
		t.Fatal(err)
	}
	var fsync, listen string
	conn.QueryRow(ctx, `SHOW fsync`).Scan(&fsync)
	conn.QueryRow(ctx, `SHOW listen_addresses`).Scan(&listen)
	if fsync != "on" || listen != "" {
		t.Errorf("fsync=%q listen_addresses=%q, want on and none", fsync, listen)
	}
	if _, err := conn.Exec(ctx, `CREATE TABLE t (x int); INSERT INTO t VALUES (1)`); err != nil {
		t.Fatal(err)
	}
	conn.Close(ctx)
	if err := c.Stop("immediate"); err != nil {
		t.Fatal(err)
	}
	if _, err := pgx.Connect(ctx, u1); err == nil {
		t.Fatal("connected to a stopped server")
	}
	if err := c.Start(); err != nil {
		t.Fatal(err)
	}
	conn, err = pgx.Connect(ctx, u1)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	var x int
	if err := conn.QueryRow(ctx, `SELECT x FROM t`).Scan(&x); err != nil || x != 1 {
		t.Fatalf("after a crash and restart: x=%d (%v), want the committed 1", x, err)
	}
	if !strings.Contains(c.URL("d"), c.SockDir[1:]) && !strings.Contains(c.URL("d"), "%2F") {
		t.Errorf("URL %s does not name the socket directory", c.URL("d"))
	}
}

// TestShared: one server for the binary, a fresh database per caller.
func TestShared(t *testing.T) {
	a, b := pgtest.Shared(t), pgtest.Shared(t)
	if a != b {
		t.Fatal("Shared started two clusters")
	}
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, a.NewDB(t))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	var n int
	if err := conn.QueryRow(ctx, `SELECT count(*) FROM pg_tables WHERE schemaname = 'public'`).Scan(&n); err != nil || n != 0 {
		t.Fatalf("new database has %d tables (%v), want 0", n, err)
	}
}

// TestStandby: a synchronous standby has every acknowledged commit when
// the primary crashes, and a multi-host URL with target_session_attrs
// reaches whichever server takes writes.
func TestStandby(t *testing.T) {
	ctx := context.Background()
	p := pgtest.New(t, pgtest.Options{Conf: pgtest.SyncReplication})
	s := p.Standby(t)
	if err := p.Exec("postgres", "CREATE DATABASE d"); err != nil {
		t.Fatal(err)
	}
	url := pgtest.MultiHostURL("d", p, s)
	conn, err := pgx.Connect(ctx, url)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := conn.Exec(ctx, `CREATE TABLE t (x int); INSERT INTO t SELECT generate_series(1, 100)`); err != nil {
		t.Fatal(err)
	}
	conn.Close(ctx)
	if err := p.Stop("immediate"); err != nil {
		t.Fatal(err)
	}
	if _, err := pgx.Connect(ctx, url); err == nil {
		t.Fatal("connected for writes to a standby before its promotion")
	}
	if err := s.Promote(); err != nil {
		t.Fatal(err)
	}
	conn, err = pgx.Connect(ctx, url)
	if err != nil {
		t.Fatalf("after promotion: %v", err)
	}
	defer conn.Close(ctx)
	var n int
	if err := conn.QueryRow(ctx, `SELECT count(*) FROM t`).Scan(&n); err != nil || n != 100 {
		t.Fatalf("the promoted standby has %d rows (%v), want the 100 committed", n, err)
	}
	if _, err := conn.Exec(ctx, `INSERT INTO t VALUES (101)`); err != nil {
		t.Fatalf("the promoted standby refuses writes: %v", err)
	}
}
