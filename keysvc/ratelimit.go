package keysvc

import (
	"net/http"
	"sync"
	"time"
)

// Default rate limits of the VM API (see WithRateLimits).
const (
	DefaultSourceRate = 200 // requests per second per source address
	DefaultVMRate     = 10  // challenges per second per VM (see allowVM)
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
// perVM challenges and activations per second for one VM from one address
// (see allowVM), each with a burst of twice the rate. Zero turns a limit
// off. Defaults: DefaultSourceRate and DefaultVMRate.
func WithRateLimits(perSource, perVM float64) Option {
	return func(s *Server) { s.sourceRate, s.vmRate = perSource, perVM }
}

// allowVM takes a token from the per-VM limit for a request naming vm. It
// must be called only after enrolledKeys accepted the EK (and AK) the
// request presents, and the bucket is that of (vm, source address): the VM
// name in a request is unauthenticated, so a limit keyed on it alone, or
// taken before the keys are checked, let anyone lock a VM out of its
// unlocks with a few requests naming it. Now a request spends the VM's
// budget only if it presents the VM's enrolled public keys and comes from
// the VM's own address (which the per-source limit bounds as a whole), and
// buckets exist only for enrolled VMs, so that invented names cannot push
// real ones into the shared overflow bucket.
func (s *Server) allowVM(r *http.Request, vm string) bool {
	return s.byVM.allow(vm + "\x00" + remoteHost(r))
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
