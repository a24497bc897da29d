package store_test

import (
	"context"
	"fmt"
	"os"
	"testing"

	"github.com/jackc/pgx/v5"

	"github.com/keygate/keygate/internal/pgtest"
	"github.com/keygate/keygate/keysvc/store"
)

// One PostgreSQL server for the package's tests, a fresh database per test.
func TestMain(m *testing.M) { os.Exit(pgtest.Main(m)) }

// backend is one fresh database of one engine. The conformance suite runs
// each store test once per engine (forEachBackend): what the Store
// interface promises, both keep.
type backend struct {
	name string
	dir  string // SQLite's data directory; "" for PostgreSQL
	url  string // PostgreSQL's database; "" for SQLite
}

// forEachBackend runs fn as a subtest per engine, each on a fresh database.
// The PostgreSQL case skips (or fails, under KEYGATE_REQUIRE) where no
// server can run.
func forEachBackend(t *testing.T, fn func(t *testing.T, b backend)) {
	t.Run("sqlite", func(t *testing.T) { fn(t, backend{name: "sqlite", dir: t.TempDir()}) })
	t.Run("postgres", func(t *testing.T) { fn(t, backend{name: "postgres", url: pgtest.Shared(t).NewDB(t)}) })
}

// each runs fn per engine with a store open on a fresh database.
func each(t *testing.T, fn func(t *testing.T, s store.Backend)) {
	forEachBackend(t, func(t *testing.T, b backend) { fn(t, b.open(t)) })
}

// open opens a store on b's database (another one, if called again: as a
// second replica or a restart would), closed in t's cleanup.
func (b backend) open(t *testing.T) store.Backend {
	t.Helper()
	var (
		s   store.Backend
		err error
	)
	if b.dir != "" {
		s, err = store.OpenSQLite(context.Background(), b.dir)
	} else {
		s, err = store.OpenPostgres(context.Background(), b.url)
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// exec runs a statement on b's database directly, as an operator or an
// attacker with database access would, bypassing the store.
func (b backend) exec(t *testing.T, query string) error {
	t.Helper()
	if b.dir != "" {
		_, err := rawDB(t, b.dir).Exec(query)
		return err
	}
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, b.url)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	_, err = conn.Exec(ctx, query)
	return err
}

// forEachCase gives a table case of a test that runs per engine a fresh
// database of b's engine.
func forEachCase(t *testing.T, b backend) backend {
	if b.dir != "" {
		return backend{name: b.name, dir: t.TempDir()}
	}
	return backend{name: b.name, url: pgtest.Shared(t).NewDB(t)}
}

// eraseElsewhere erases vol-1 on an engine whose files the test cannot
// inspect (PostgreSQL's erase caveats are in Postgres.UpdateVolume's
// comment): the erase must show, and stay, in the store.
func eraseElsewhere(s store.Backend) error {
	ctx := context.Background()
	v, err := s.UpdateVolume(ctx, "vol-1", func(v *store.Volume) error { v.SealedUK = nil; return nil })
	if err != nil {
		return err
	}
	got, err := s.GetVolume(ctx, "vol-1")
	if err != nil {
		return err
	}
	if !got.Erased() || got.SealedUK != nil || got.ErasedAt.IsZero() || !got.ErasedAt.Equal(v.ErasedAt) {
		return fmt.Errorf("after erase got %+v", got)
	}
	return nil
}
