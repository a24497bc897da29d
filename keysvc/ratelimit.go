package keysvc

import (
	"net/http"
	"sync"
	"time"
)

// Default rate limits of the VM API (see WithRateLimits).
const (
	DefaultSourceRate = 200 // requests per second per source address
	DefaultVMRate     = 10  // challenges per second per VM name
)

// maxBuckets bounds the memory a limiter spends on distinct keys; when it is
// reached, buckets that have refilled completely are dropped, and if none
// has, new keys share one overflow bucket.
const maxBuckets = 1 << 16

// limiter is a set of token buckets, one per key, each holding up to burst
// tokens and refilled at rate per second.
type limiter struct {
	mu      sync.Mutex
	rate    float64
	burst   float64
	buckets map[string]*bucket
	now     func() time.Time
}

type bucket struct {
	tokens float64
	last   time.Time
}

func newLimiter(rate float64, now func() time.Time) *limiter {
	if rate <= 0 {
		return nil
	}
	return &limiter{rate: rate, burst: 2 * rate, buckets: make(map[string]*bucket), now: now}
}

// allow takes a token from key's bucket. A nil limiter allows everything.
func (l *limiter) allow(key string) bool {
	if l == nil {
		return true
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	now := l.now()
	b, ok := l.buckets[key]
	if !ok {
		if len(l.buckets) >= maxBuckets {
			l.sweep(now)
		}
		if len(l.buckets) >= maxBuckets {
			key = "\x00overflow"
			if b = l.buckets[key]; b == nil {
				b = &bucket{tokens: l.burst, last: now}
				l.buckets[key] = b
			}
		} else {
			b = &bucket{tokens: l.burst, last: now}
			l.buckets[key] = b
		}
	}
	b.tokens = min(l.burst, b.tokens+now.Sub(b.last).Seconds()*l.rate)
	b.last = now
	if b.tokens < 1 {
		return false
	}
	b.tokens--
	return true
}

// sweep drops buckets that would be full by now. The caller holds l.mu.
func (l *limiter) sweep(now time.Time) {
	for k, b := range l.buckets {
		if b.tokens+now.Sub(b.last).Seconds()*l.rate >= l.burst {
			delete(l.buckets, k)
		}
	}
}

// WithRateLimits sets the rate limits: perSource requests per second from
// one source address (to the VM API, and separately to the admin API), and
// perVM challenges
// per second for one VM name, each with a burst of twice the rate. Zero
// turns a limit off. Defaults: DefaultSourceRate and DefaultVMRate.
func WithRateLimits(perSource, perVM float64) Option {
	return func(s *Server) { s.sourceRate, s.vmRate = perSource, perVM }
}

func tooMany(w http.ResponseWriter, what string) {
	w.Header().Set("Retry-After", "1")
	writeError(w, errorf(http.StatusTooManyRequests, "retry after a second; a VM needs one challenge per unlock", "too many requests from this %s", what))
}

// limitSource applies a per-source limit to an API. The admin API has its
// own limiter, so that VM traffic from a host cannot starve its operator,
// and so that unauthenticated requests cannot flood the audit chain.
func limitSource(l *limiter, next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !l.allow(remoteHost(r)) {
			tooMany(w, "address")
			return
		}
		next.ServeHTTP(w, r)
	})
}
