package keysvc_test

import (
	"fmt"
	"net/http"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/keygate/keygate/keysvc"
)

// BenchmarkUnlock drives the real HTTPS VM API (TLS 1.3, SQLite store, audit
// chain on) with 256 concurrent clients doing POST /v1/unlock for 64
// enrolled VMs, each with its own volume and policy; client c unlocks VM
// c%64, so four clients share a VM.
//
// The VMs are played by one TPM simulator: every VM is enrolled with its EK
// and AK (the service allows one EK for several VMs). The simulator quotes
// one request at a time and would be the bottleneck, so the quotes are
// precomputed: before the timer starts, b.N challenges are issued and
// quoted (the challenge TTL is raised to cover that). Each client has its
// own connection, opened and used once before the timer starts, so the 256
// TLS handshakes are not timed either. What is timed is the service's work
// per unlock: challenge redeem (a store write), quote verification,
// unsealing the UK, CreateImportBlob and the audit append. It reports
// unlocks/s and p50/p99 latency.
//
//	go test ./keysvc -run '^$' -bench '^BenchmarkUnlock$' -benchtime 2000x
func BenchmarkUnlock(b *testing.B) {
	const (
		vms     = 64
		clients = 256
	)
	e := startEnv(b, b.TempDir(), keysvc.WithRateLimits(0, 0), keysvc.WithChallengeTTL(time.Hour))
	v := openVM(b)
	names, vols := make([]string, vms), make([]string, vms)
	for i := range vms {
		names[i] = fmt.Sprintf("bench-%02d", i)
		vols[i] = setup(b, e, v, names[i])
	}
	// Request i is sent by client i%clients, for that client's VM.
	reqs := make([]keysvc.UnlockRequest, b.N)
	for i := range reqs {
		vm := i % clients % vms
		ch := e.challenge(b, v, names[vm], vols[vm])
		reqs[i] = keysvc.UnlockRequest{Challenge: ch.Challenge, Attestation: v.quote(b, ch.Nonce)}
	}
	conns := make([]*env, clients)
	var wg sync.WaitGroup
	for c := range conns {
		conns[c] = e.from(b, "127.0.0.1")
		wg.Go(func() {
			// Any answer will do: this only opens the connection.
			conns[c].post("/v1/session", struct{}{})
		})
	}
	wg.Wait()

	lat := make([]time.Duration, b.N)
	var (
		mu   sync.Mutex
		fail error
	)
	b.ResetTimer()
	start := time.Now()
	for c := range clients {
		wg.Go(func() {
			for i := c; i < b.N; i += clients {
				t0 := time.Now()
				code, body, err := conns[c].post("/v1/unlock", reqs[i])
				lat[i] = time.Since(t0)
				if err == nil && code != http.StatusOK {
					err = &unexpected{code, string(body)}
				}
				if err != nil {
					mu.Lock()
					fail = err
					mu.Unlock()
				}
			}
		})
	}
	wg.Wait()
	elapsed := time.Since(start)
	b.StopTimer()
	if fail != nil {
		b.Fatal(fail)
	}
	slices.Sort(lat)
	b.ReportMetric(float64(b.N)/elapsed.Seconds(), "unlocks/s")
	b.ReportMetric(float64(lat[len(lat)/2].Microseconds())/1000, "p50-ms")
	b.ReportMetric(float64(lat[len(lat)*99/100].Microseconds())/1000, "p99-ms")
}

type unexpected struct {
	code int
	body string
}

func (u *unexpected) Error() string { return fmt.Sprintf("unlock: %d %s", u.code, u.body) }
