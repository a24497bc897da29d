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
// chain on) with 256 concurrent clients, each doing POST /v1/unlock.
//
// The TPM simulator quotes one request at a time and would be the
// bottleneck, so the quotes are precomputed: before the timer starts, b.N
// challenges are issued and quoted (the challenge TTL is raised to cover
// that). What is timed is the service's work per unlock: challenge redeem
// (a store write), quote verification, unsealing the UK, CreateImportBlob
// and the audit append. It reports unlocks/s and p50/p99 latency.
//
//	go test ./keysvc -run '^$' -bench Unlock -benchtime 2000x
func BenchmarkUnlock(b *testing.B) {
	e := startEnv(b, b.TempDir(), keysvc.WithRateLimits(0, 0), keysvc.WithChallengeTTL(time.Hour))
	v := openVM(b)
	vol := setup(b, e, v, "bench")
	reqs := make([]keysvc.UnlockRequest, b.N)
	for i := range reqs {
		ch := e.challenge(b, v, "bench", vol)
		reqs[i] = keysvc.UnlockRequest{Challenge: ch.Challenge, Attestation: v.quote(b, ch.Nonce)}
	}
	const clients = 256
	lat := make([]time.Duration, b.N)
	next := make(chan int, b.N)
	for i := range b.N {
		next <- i
	}
	close(next)
	var (
		wg   sync.WaitGroup
		mu   sync.Mutex
		fail error
	)
	b.ResetTimer()
	start := time.Now()
	for range clients {
		wg.Go(func() {
			for i := range next {
				t0 := time.Now()
				code, body, err := e.post("/v1/unlock", reqs[i])
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
