package keysvc_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/keygate/keygate/keysvc"
	"github.com/keygate/keygate/keysvc/api"
	"github.com/keygate/keygate/keysvc/audit"
)

// TestRefusalFloodBounded: 10,000 bogus challenges from one address (the
// per-source request limit off, so that every one reaches the handler and
// is refused) grow the audit chain by a bounded amount, set by the refusal
// audit budget and the time the flood took, not by the number of requests;
// every refusal is still accounted for, one by one or in a summary record;
// names are cut to the store's limit; and real unlocks during the flood
// succeed. Latencies are logged, not asserted.
func TestRefusalFloodBounded(t *testing.T) {
	if testing.Short() {
		t.Skip("sends 10,000 requests")
	}
	const flood = 10000
	e := startEnv(t, t.TempDir(), keysvc.WithRateLimits(0, 0)) // both limits off: the audit budget alone bounds the chain
	v := openVM(t)
	vol := setup(t, e, v, "real")
	records := func() []audit.Record {
		var all []audit.Record
		for from := 1; ; {
			var recs []audit.Record
			json.Unmarshal(e.admin(t, "GET", fmt.Sprintf("/v1/admin/audit?from=%d", from), nil, http.StatusOK), &recs)
			all = append(all, recs...)
			if len(recs) < 1000 {
				return all
			}
			from = int(recs[len(recs)-1].Seq) + 1
		}
	}
	timeUnlocks := func(n int) []time.Duration {
		var out []time.Duration
		for range n {
			start := time.Now()
			if code, body := e.unlock(t, v, "real", vol); code != http.StatusOK {
				t.Errorf("real unlock: %d %s", code, body)
			}
			out = append(out, time.Since(start))
		}
		return out
	}
	before := timeUnlocks(10)
	n0 := len(records())

	ek := randomPEM(t)
	long := strings.Repeat("x", 4000)
	var refused, other atomic.Int64
	var during []time.Duration
	start := time.Now()
	var wg sync.WaitGroup
	next := atomic.Int64{}
	for range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := next.Add(1)
				if i > flood {
					return
				}
				name := fmt.Sprintf("bogus-%d", i)
				if i%10 == 0 {
					name = long + name
				}
				code, _, err := e.post("/v1/challenge", api.ChallengeRequest{VM: name, Volume: name, EKPub: ek, AKPub: ek})
				if err == nil && code == http.StatusForbidden {
					refused.Add(1)
				} else {
					other.Add(1)
				}
			}
		}()
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		for next.Load() < flood {
			during = append(during, timeUnlocks(1)...)
		}
	}()
	wg.Wait()
	elapsed := time.Since(start)
	e.svc.Server.FlushAudit(context.Background())
	if refused.Load() != flood {
		t.Fatalf("%d of %d bogus challenges refused (403), %d otherwise", refused.Load(), flood, other.Load())
	}

	recs := records()[n0:]
	var denials, summaries, summarised, real int
	for _, r := range recs {
		if len(r.Actor) > len("vm:")+128+len("…") || len(r.Subject) > 512 {
			t.Errorf("record %d keeps a %d-byte actor, %d-byte subject: names must be cut to the store's limit", r.Seq, len(r.Actor), len(r.Subject))
		}
		switch {
		case r.Action == audit.ActionDeny && strings.HasPrefix(r.Actor, "vm:bogus-"), r.Action == audit.ActionDeny && strings.HasPrefix(r.Actor, "vm:xxx"):
			denials++
		case r.Action == audit.ActionDeny && r.Actor == "keysvc":
			var s audit.Summary
			json.Unmarshal(r.Details, &s)
			summaries++
			summarised += int(s.Count)
		default:
			real++ // the real unlocks' records, the admin reads' outcomes
		}
	}
	// Each token of the budget (burst 2r, then r per second) lets through
	// one denial and at most one summary before it.
	rate := float64(keysvc.DefaultRefusalAuditRate)
	bound := 2 * int(2*rate+rate*elapsed.Seconds()+1)
	t.Logf("flood of %d refusals in %v: %d denial records, %d summaries (covering %d), bound %d; chain grew by %d",
		flood, elapsed.Round(time.Millisecond), denials, summaries, summarised, bound, len(recs))
	if denials+summaries > bound {
		t.Errorf("the flood added %d records, more than the budget's bound %d", denials+summaries, bound)
	}
	if denials+summarised != flood {
		t.Errorf("%d denial records + %d summarised = %d, want every one of the %d refusals accounted for", denials, summarised, denials+summarised, flood)
	}
	if len(during) == 0 {
		t.Error("no real unlock ran during the flood")
	}
	t.Logf("real unlock latency before the flood: %s; during it (%d unlocks): %s", quantiles(before), len(during), quantiles(during))
}

func quantiles(d []time.Duration) string {
	s := slices.Clone(d)
	slices.Sort(s)
	q := func(p float64) time.Duration { return s[int(p*float64(len(s)-1))].Round(10 * time.Microsecond) }
	return fmt.Sprintf("p50 %v, p90 %v, max %v", q(0.5), q(0.9), s[len(s)-1].Round(10*time.Microsecond))
}
