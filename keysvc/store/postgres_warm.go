package store

import (
	"context"
	"sync"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// A new PostgreSQL connection is slow at first: its backend loads the
// catalog entries of every table it touches, and pgx prepares each
// statement on its first use. Paid inside the first unlocks after a start
// or a database failover, that put the open-loop benchmark's p99 at
// 1,000/s above 300 ms while its steady state was under 50 ms (the first
// second's unlocks waited up to 480 ms). So the pool keeps its connections
// open (MinConns = MaxConns unless the URL sets pool_min_conns), and every
// connection runs the unlock path's reads once before it serves: at open
// (warmPool) and whenever the pool replaces one (AfterConnect).

// warmReads are the unlock path's statements that read only, with
// arguments that match no row.
var warmReads = []struct {
	sql  string
	args []any
}{
	{qVMAndVolume, []any{"", ""}},
	{qVMAndVolumeUsing, []any{"", "", ""}},
	{qVMsAndVolumes, []any{[]string{}, []string{}}},
	{qChallengeUsed, []any{""}},
	{qLastAudit, nil},
	// The writer's tables, by reads that lock nothing: qLockHead would
	// wait for another replica's writer, and qFlush writes.
	{"SELECT seq, hash, mac FROM audit_head WHERE id = 1", nil},
	{"SELECT n FROM commit_flush WHERE pid = 0", nil},
}

// warmConn runs warmReads on c. Errors are ignored: a warm-up that fails
// (tables not migrated yet, the database going away) only leaves the
// connection as cold as it would have been.
func warmConn(ctx context.Context, c *pgx.Conn) error {
	for _, w := range warmReads {
		rows, err := c.Query(ctx, w.sql, w.args...)
		if err == nil {
			rows.Close()
		}
	}
	return nil
}

// warmPool opens the pool's connections (up to MinConns) and warms each,
// in parallel, before the store serves.
func warmPool(ctx context.Context, pool *pgxpool.Pool, n int32) {
	var wg sync.WaitGroup
	conns := make([]*pgxpool.Conn, n)
	for i := range conns {
		wg.Go(func() {
			c, err := pool.Acquire(ctx)
			if err != nil {
				return
			}
			warmConn(ctx, c.Conn())
			conns[i] = c
		})
	}
	wg.Wait()
	for _, c := range conns {
		if c != nil {
			c.Release()
		}
	}
}
