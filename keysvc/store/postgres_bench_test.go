package store_test

import (
	"context"
	"crypto/sha256"
	"flag"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/keygate/keygate/internal/pgtest"
	"github.com/keygate/keygate/keysvc/store"
)

var (
	auditRate     = flag.Float64("store.rate", 1000, "BenchmarkPostgresAuditOpenLoop's offered appends per second")
	auditReplicas = flag.Int("store.replicas", 2, "BenchmarkPostgresAuditOpenLoop's stores (replicas) on one database")
	auditWork     = flag.Duration("store.work", 400*time.Microsecond, "CPU each append's request spends before it (a quote's verification)")
)

// BenchmarkPostgresAuditOpenLoop isolates the audit chain's part of an
// unlock on PostgreSQL: requests arrive at a fixed rate (-store.rate),
// spread over -store.replicas stores on one database (the replicas, in one
// process here), and each spends -store.work of CPU (what verifying its
// quote costs) before its audit append, so that the writers run among as
// many runnable goroutines as a loaded key service has. It reports the
// append's latency (p50, p99) and the request's, from when it was due.
//
//	go test ./keysvc/store -run '^$' -bench PostgresAuditOpenLoop -benchtime 6000x
func BenchmarkPostgresAuditOpenLoop(b *testing.B) {
	url := pgtest.Shared(b).NewDB(b)
	ctx := context.Background()
	stores := make([]*store.Postgres, *auditReplicas)
	for i := range stores {
		p, err := store.OpenPostgres(ctx, url)
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { p.Close() })
		p.SetCommitDelay(store.DefaultCommitDelay, func() int { return 8 })
		stores[i] = p
	}
	appendLat, reqLat := make([]time.Duration, b.N), make([]time.Duration, b.N)
	var (
		wg   sync.WaitGroup
		mu   sync.Mutex
		fail error
	)
	b.ResetTimer()
	start := time.Now()
	for i := range b.N {
		due := start.Add(time.Duration(float64(i) / *auditRate * float64(time.Second)))
		time.Sleep(time.Until(due))
		wg.Go(func() {
			burn(*auditWork)
			t0 := time.Now()
			err := stores[i%len(stores)].AppendAudit(ctx, chainNext)
			appendLat[i], reqLat[i] = time.Since(t0), time.Since(due)
			if err != nil {
				mu.Lock()
				fail = err
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	elapsed := time.Since(start)
	b.StopTimer()
	if fail != nil {
		b.Fatal(fail)
	}
	b.ReportMetric(float64(b.N)/elapsed.Seconds(), "appends/s")
	// Every batch moves the head once: its updates count the batches
	// (counted once the stores' connections have closed and flushed their
	// statistics).
	for _, p := range stores {
		p.Close()
	}
	time.Sleep(time.Second)
	conn, err := pgx.Connect(ctx, url)
	if err != nil {
		b.Fatal(err)
	}
	defer conn.Close(ctx)
	var batches int64
	if err := conn.QueryRow(ctx, `SELECT n_tup_upd FROM pg_stat_user_tables WHERE relname = 'audit_head'`).Scan(&batches); err != nil {
		b.Fatal(err)
	}
	if batches > 0 {
		b.ReportMetric(float64(b.N)/float64(batches), "appends/batch")
	}
	for _, l := range []struct {
		name string
		d    []time.Duration
	}{{"append", appendLat}, {"request", reqLat}} {
		slices.Sort(l.d)
		b.ReportMetric(float64(l.d[len(l.d)/2].Microseconds())/1000, l.name+"-p50-ms")
		b.ReportMetric(float64(l.d[len(l.d)*99/100].Microseconds())/1000, l.name+"-p99-ms")
	}
}

// burn spends about d of CPU.
func burn(d time.Duration) {
	var h [32]byte
	for end := time.Now().Add(d); time.Now().Before(end); {
		for range 64 {
			h = sha256.Sum256(h[:])
		}
	}
}

// chainNext appends to the chain (a real hash is not needed here: the
// store only keeps what it is given).
func chainNext(last *store.AuditRecord, _ *store.AuditHead) (store.AuditRecord, store.AuditHead, error) {
	seq := uint64(1)
	if last != nil {
		seq = last.Seq + 1
	}
	h := sha256.Sum256([]byte{byte(seq), byte(seq >> 8), byte(seq >> 16)})
	r := store.AuditRecord{Seq: seq, Time: time.Now(), Actor: "vm:bench", Action: "unlock", Subject: "vol", Details: []byte(`{"volume":"vol"}`),
		PrevHash: make([]byte, 32), Hash: h[:], MAC: h[:]}
	return r, store.AuditHead{Seq: seq, Hash: r.Hash, MAC: r.MAC}, nil
}
