package attest_test

import (
	"bytes"
	"crypto"
	"encoding/base64"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/keygate/keygate/attest"
)

var testKey = bytes.Repeat([]byte{0x42}, 32)

// fakeClock is a settable clock for Issue and the replay cache.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *fakeClock) Now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.t }
func (c *fakeClock) Add(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

func newClock() *fakeClock { return &fakeClock{t: time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)} }

type binding struct {
	vm, volume string
	ek, ak     crypto.PublicKey
}

func TestChallengeCheck(t *testing.T) {
	clk := newClock()
	ch, err := attest.NewChallenger(testKey, attest.WithClock(clk.Now), attest.WithTTL(time.Minute))
	if err != nil {
		t.Fatal(err)
	}
	other, err := attest.NewChallenger(bytes.Repeat([]byte{7}, 32), attest.WithClock(clk.Now))
	if err != nil {
		t.Fatal(err)
	}
	b := binding{"vm-1", "vol-1", randomKey(t), randomKey(t)}
	nonce, tok, err := ch.Issue(b.vm, b.volume, b.ek, b.ak)
	if err != nil {
		t.Fatal(err)
	}
	if len(nonce) != attest.NonceSize {
		t.Fatalf("nonce is %d bytes, want %d", len(nonce), attest.NonceSize)
	}
	if !strings.HasPrefix(tok, "v1.") {
		t.Fatalf("token %q lacks the v1. prefix", tok)
	}
	_, foreign, err := other.Issue(b.vm, b.volume, b.ek, b.ak)
	if err != nil {
		t.Fatal(err)
	}
	parts := strings.Split(tok, ".")
	flipMAC := func() string {
		mac, _ := base64.RawURLEncoding.DecodeString(parts[2])
		mac[0] ^= 1
		return parts[0] + "." + parts[1] + "." + base64.RawURLEncoding.EncodeToString(mac)
	}
	flipPayload := func() string {
		p, _ := base64.RawURLEncoding.DecodeString(parts[1])
		p[len(p)-1] ^= 1 // last byte of the volume name
		return parts[0] + "." + base64.RawURLEncoding.EncodeToString(p) + "." + parts[2]
	}
	now := clk.Now()
	tests := []struct {
		name  string
		token string
		b     binding
		now   time.Time
		want  error
	}{
		{"valid", tok, b, now, nil},
		{"valid just before expiry", tok, b, now.Add(time.Minute - time.Nanosecond), nil},
		{"expired", tok, b, now.Add(time.Minute), attest.ErrChallengeExpired},
		{"tampered MAC", flipMAC(), b, now, attest.ErrChallengeMAC},
		{"tampered payload", flipPayload(), b, now, attest.ErrChallengeMAC},
		{"foreign key", foreign, b, now, attest.ErrChallengeMAC},
		{"wrong vm", tok, binding{"vm-2", b.volume, b.ek, b.ak}, now, attest.ErrChallengeBinding},
		{"wrong volume", tok, binding{b.vm, "vol-2", b.ek, b.ak}, now, attest.ErrChallengeBinding},
		{"wrong EK", tok, binding{b.vm, b.volume, randomKey(t), b.ak}, now, attest.ErrChallengeBinding},
		{"wrong AK", tok, binding{b.vm, b.volume, b.ek, randomKey(t)}, now, attest.ErrChallengeBinding},
		{"EK and AK swapped", tok, binding{b.vm, b.volume, b.ak, b.ek}, now, attest.ErrChallengeBinding},
		{"empty", "", b, now, attest.ErrChallengeMalformed},
		{"two parts", "v1.abc", b, now, attest.ErrChallengeMalformed},
		{"four parts", tok + ".x", b, now, attest.ErrChallengeMalformed},
		{"other version", "v2." + parts[1] + "." + parts[2], b, now, attest.ErrChallengeMalformed},
		{"bad base64", "v1.!!!." + parts[2], b, now, attest.ErrChallengeMalformed},
		{"padded base64", "v1." + parts[1] + "=." + parts[2], b, now, attest.ErrChallengeMalformed},
		{"short mac", "v1." + parts[1] + ".AAAA", b, now, attest.ErrChallengeMalformed},
		{"huge", "v1." + strings.Repeat("A", 10000) + "." + parts[2], b, now, attest.ErrChallengeMalformed},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			cl, err := ch.Check(tc.token, tc.b.vm, tc.b.volume, tc.b.ek, tc.b.ak, tc.now)
			if !errors.Is(err, tc.want) || (tc.want == nil) != (err == nil) {
				t.Fatalf("Check: err = %v, want %v", err, tc.want)
			}
			if err != nil {
				return
			}
			if !bytes.Equal(cl.Nonce, nonce) || cl.VM != b.vm || cl.Volume != b.volume {
				t.Errorf("claims = %+v, want nonce %x vm %s volume %s", cl, nonce, b.vm, b.volume)
			}
			if !cl.Expiry.Equal(now.Add(time.Minute)) {
				t.Errorf("expiry = %v, want %v", cl.Expiry, now.Add(time.Minute))
			}
		})
	}
}

func TestChallengeRedeemReplay(t *testing.T) {
	clk := newClock()
	cache := attest.NewMemReplayCache(16, clk.Now)
	ch, err := attest.NewChallenger(testKey, attest.WithClock(clk.Now), attest.WithReplayCache(cache))
	if err != nil {
		t.Fatal(err)
	}
	ek, ak := randomKey(t), randomKey(t)
	_, tok, err := ch.Issue("vm", "vol", ek, ak)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ch.Redeem(tok, "vm", "vol", ek, ak, clk.Now()); err != nil {
		t.Fatalf("first redeem: %v", err)
	}
	if _, err := ch.Redeem(tok, "vm", "vol", ek, ak, clk.Now()); !errors.Is(err, attest.ErrChallengeReplayed) {
		t.Fatalf("second redeem: err = %v, want ErrChallengeReplayed", err)
	}
	// A token for another binding fails its check and is not consumed.
	_, tok2, _ := ch.Issue("vm", "vol", ek, ak)
	if _, err := ch.Redeem(tok2, "vm", "other", ek, ak, clk.Now()); !errors.Is(err, attest.ErrChallengeBinding) {
		t.Fatalf("redeem wrong binding: err = %v", err)
	}
	if _, err := ch.Redeem(tok2, "vm", "vol", ek, ak, clk.Now()); err != nil {
		t.Fatalf("redeem after failed check: %v", err)
	}
	noCache, _ := attest.NewChallenger(testKey)
	if _, err := noCache.Redeem(tok, "vm", "vol", ek, ak, clk.Now()); err == nil {
		t.Fatal("Redeem without a replay cache succeeded")
	}
}

func TestMemReplayCache(t *testing.T) {
	clk := newClock()
	id := func(i int) []byte { return []byte{byte(i)} }
	tests := []struct {
		name string
		run  func(t *testing.T, c *attest.MemReplayCache)
	}{
		{"second use refused", func(t *testing.T, c *attest.MemReplayCache) {
			exp := clk.Now().Add(time.Minute)
			if fresh, err := c.Use(id(1), exp); !fresh || err != nil {
				t.Fatalf("first Use = %v, %v", fresh, err)
			}
			if fresh, err := c.Use(id(1), exp); fresh || err != nil {
				t.Fatalf("second Use = %v, %v; want false, nil", fresh, err)
			}
		}},
		{"full of unexpired refuses", func(t *testing.T, c *attest.MemReplayCache) {
			exp := clk.Now().Add(time.Minute)
			for i := range 3 {
				if fresh, err := c.Use(id(i), exp); !fresh || err != nil {
					t.Fatalf("Use %d = %v, %v", i, fresh, err)
				}
			}
			if fresh, err := c.Use(id(9), exp); fresh || !errors.Is(err, attest.ErrReplayCacheFull) {
				t.Fatalf("Use when full = %v, %v; want ErrReplayCacheFull", fresh, err)
			}
			// Forgetting one would allow its replay: it is still refused.
			if fresh, _ := c.Use(id(0), exp); fresh {
				t.Fatal("replay accepted after the cache filled up")
			}
		}},
		{"expired entries make room", func(t *testing.T, c *attest.MemReplayCache) {
			for i := range 3 {
				c.Use(id(i), clk.Now().Add(time.Second))
			}
			clk.Add(2 * time.Second)
			if fresh, err := c.Use(id(9), clk.Now().Add(time.Minute)); !fresh || err != nil {
				t.Fatalf("Use after expiry = %v, %v", fresh, err)
			}
			if n := c.Len(); n != 1 {
				t.Fatalf("Len = %d after purge, want 1", n)
			}
		}},
		{"expired id not recorded", func(t *testing.T, c *attest.MemReplayCache) {
			if fresh, _ := c.Use(id(1), clk.Now()); fresh {
				t.Fatal("expired challenge accepted")
			}
			if c.Len() != 0 {
				t.Fatal("expired challenge recorded")
			}
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) { tc.run(t, attest.NewMemReplayCache(3, clk.Now)) })
	}
}

func TestNewChallengerShortKey(t *testing.T) {
	if _, err := attest.NewChallenger(make([]byte, 16)); err == nil {
		t.Fatal("NewChallenger accepted a 16-byte key")
	}
}

// TestMemReplayCacheConcurrent: of many concurrent redemptions of one
// challenge, exactly one wins.
func TestMemReplayCacheConcurrent(t *testing.T) {
	c := attest.NewMemReplayCache(8, nil)
	exp := time.Now().Add(time.Minute)
	var wg sync.WaitGroup
	var mu sync.Mutex
	fresh := 0
	for range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ok, err := c.Use([]byte("same"), exp)
			if err != nil {
				t.Error(err)
			}
			if ok {
				mu.Lock()
				fresh++
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	if fresh != 1 {
		t.Fatalf("%d concurrent uses were fresh, want 1", fresh)
	}
}
