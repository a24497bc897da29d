package attest

import (
	"errors"
	"fmt"
	"sync"
	"time"
)

// ErrReplayCacheFull is returned by MemReplayCache.Use when every slot holds
// a challenge that has not expired yet. The cache refuses the new challenge
// rather than forget an unexpired one, which would let that one be replayed.
var ErrReplayCacheFull = errors.New("replay cache full")

// MemReplayCache is an in-memory ReplayCache for a single key service
// replica and for tests. It holds at most a fixed number of unexpired
// challenges; expired ones are dropped as room is needed. It is safe for
// concurrent use. Several replicas need a shared cache (the key service's
// store) instead.
type MemReplayCache struct {
	mu   sync.Mutex
	max  int
	now  func() time.Time
	used map[string]time.Time
}

// NewMemReplayCache returns a cache for at most max unexpired challenges
// that tells time with now (time.Now when nil). Size it as the challenge
// rate times the challenge TTL, with headroom.
func NewMemReplayCache(max int, now func() time.Time) *MemReplayCache {
	if max < 1 {
		max = 1
	}
	if now == nil {
		now = time.Now
	}
	return &MemReplayCache{max: max, now: now, used: make(map[string]time.Time)}
}

// Use implements ReplayCache.
func (c *MemReplayCache) Use(id []byte, expiry time.Time) (bool, error) {
	if len(id) == 0 {
		return false, errors.New("replay cache: empty challenge id")
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	now := c.now()
	k := string(id)
	if exp, ok := c.used[k]; ok && now.Before(exp) {
		return false, nil
	}
	if !now.Before(expiry) {
		// Already expired: Check refuses it anyway; never remember it.
		return false, nil
	}
	if len(c.used) >= c.max {
		c.purge(now)
		if len(c.used) >= c.max {
			return false, fmt.Errorf("%w: %d unexpired challenges held; raise the cache size or shorten the challenge TTL", ErrReplayCacheFull, len(c.used))
		}
	}
	c.used[k] = expiry
	return true, nil
}

// Len returns the number of challenges held, expired or not.
func (c *MemReplayCache) Len() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.used)
}

func (c *MemReplayCache) purge(now time.Time) {
	for k, exp := range c.used {
		if !now.Before(exp) {
			delete(c.used, k)
		}
	}
}
