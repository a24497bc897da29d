package client

import (
	"context"
	"net/http"
	"testing"
	"time"

	"github.com/keygate/keygate/internal/testutil"
	"github.com/keygate/keygate/keysvc"
	"github.com/keygate/keygate/keysvc/api"
)

// BenchmarkFirstChallenge measures what a booting VM's first request
// costs with a fresh client (no connection yet): POST /v1/challenge to a
// real key service on loopback, alone ("live") and with a dead or unwell
// replica first in the list. The difference is the time a VM loses to
// that replica (scripts/bench.sh prints it; target under 1 s). Each
// iteration makes a new client, as a boot does.
func BenchmarkFirstChallenge(b *testing.B) {
	// One VM asks again and again here: no per-VM rate limit.
	s := startService(b, keysvc.WithRateLimits(0, 0))
	adm, err := New(Config{URLs: []string{s.adminURL()}, CA: s.ca, Token: s.token})
	if err != nil {
		b.Fatal(err)
	}
	defer adm.Close()
	req := api.ChallengeRequest{VM: "bench", Volume: "bench-vol", EKPub: pubPEM(b), AKPub: pubPEM(b)}
	ctx := context.Background()
	if _, err := adm.EnrollVM(ctx, api.EnrollRequest{Name: req.VM, EKPub: req.EKPub, AKPub: req.AKPub}); err != nil {
		b.Fatal(err)
	}
	if _, err := adm.AddVolume(ctx, api.VolumeRequest{ID: req.Volume, VM: req.VM}); err != nil {
		b.Fatal(err)
	}
	for _, tc := range []struct {
		name  string
		first func() string
	}{
		{"live", nil},
		{"refused-first", func() string { return testutil.ClosedPort(b) }},
		{"no-handshake-first", func() string { return testutil.BlackHole(b) }},
		{"503-first", func() string { return testutil.FixedServer(b, s.cert(b), http.StatusServiceUnavailable, "").URL }},
	} {
		b.Run(tc.name, func(b *testing.B) {
			urls := []string{s.vmURL()}
			if tc.first != nil {
				urls = append([]string{tc.first()}, urls...)
			}
			var total time.Duration
			for b.Loop() {
				c, err := New(Config{URLs: urls, CA: s.ca})
				if err != nil {
					b.Fatal(err)
				}
				start := time.Now()
				if _, err := c.Challenge(ctx, req); err != nil {
					b.Fatal(err)
				}
				total += time.Since(start)
				c.Close()
			}
			b.ReportMetric(float64(total.Microseconds())/1000/float64(b.N), "ms/first-call")
		})
	}
}
