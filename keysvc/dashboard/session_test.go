package dashboard

import (
	"net/http/httptest"
	"strings"
	"testing"
	"time"
)

type fakeClock struct{ t time.Time }

func (c *fakeClock) now() time.Time { return c.t }

// TestSessionExpiry: a session ends at its idle limit, at its absolute
// limit however busy, and when ended; only its cookie opens it.
func TestSessionExpiry(t *testing.T) {
	for _, tc := range []struct {
		name  string
		steps []time.Duration // time between requests
		live  bool
	}{
		{"fresh", []time.Duration{time.Minute}, true},
		{"idle", []time.Duration{DefaultSessionIdle}, false},
		{"busy within ttl", []time.Duration{20 * time.Minute, 20 * time.Minute, 20 * time.Minute}, true},
		{"busy past ttl", func() (d []time.Duration) {
			for range 17 {
				d = append(d, 29*time.Minute)
			}
			return d
		}(), false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := &fakeClock{t: time.Date(2026, 12, 4, 0, 0, 0, 0, time.UTC)}
			ss := newSessions(DefaultSessionTTL, DefaultSessionIdle, c.now)
			id, _ := ss.create("token")
			r := httptest.NewRequest("GET", "/ui/", nil)
			r.Header.Set("Cookie", CookieName+"="+id)
			var live bool
			for _, d := range tc.steps {
				c.t = c.t.Add(d)
				live = ss.get(r) != nil
			}
			if live != tc.live {
				t.Fatalf("session live %v, want %v", live, tc.live)
			}
		})
	}
	c := &fakeClock{t: time.Now()}
	ss := newSessions(DefaultSessionTTL, DefaultSessionIdle, c.now)
	id, s := ss.create("token")
	if !strings.HasPrefix(s.actor, "ui:") || strings.Contains(s.actor, id[:8]) {
		t.Fatalf("actor %q: want ui:<hash prefix>, never the cookie", s.actor)
	}
	other := httptest.NewRequest("GET", "/ui/", nil)
	other.Header.Set("Cookie", CookieName+"="+id+"x")
	if ss.get(other) != nil {
		t.Fatal("another cookie value opened the session")
	}
	r := httptest.NewRequest("GET", "/ui/", nil)
	r.Header.Set("Cookie", CookieName+"="+id)
	ss.end(r)
	if ss.get(r) != nil {
		t.Fatal("an ended session still opens")
	}
}

func TestLoginFailures(t *testing.T) {
	c := &fakeClock{t: time.Now()}
	f := failures{now: c.now}
	for range maxFailures - 1 {
		f.add("a")
	}
	if f.blocked("a") {
		t.Fatal("blocked before the limit")
	}
	f.add("a")
	if !f.blocked("a") || f.blocked("b") {
		t.Fatal("the limit blocks the wrong source")
	}
	c.t = c.t.Add(failWindowLen)
	if f.blocked("a") {
		t.Fatal("still blocked after the window")
	}
}

func TestSameOrigin(t *testing.T) {
	for _, tc := range []struct {
		origin, site string
		ok           bool
	}{
		{"https://kg:8444", "same-origin", true},
		{"https://kg:8444", "", true},
		{"null", "same-origin", true},
		{"", "same-origin", true},
		{"null", "", false},
		{"", "", false},
		{"https://evil", "", false},
		{"https://kg:8444", "cross-site", false},
		{"http://kg:8444", "", false},
		{"null", "same-site", false},
	} {
		r := httptest.NewRequest("POST", "https://kg:8444/ui/login", nil)
		if tc.origin != "" {
			r.Header.Set("Origin", tc.origin)
		}
		if tc.site != "" {
			r.Header.Set("Sec-Fetch-Site", tc.site)
		}
		if got := sameOrigin(r); got != tc.ok {
			t.Errorf("Origin %q Sec-Fetch-Site %q: %v, want %v", tc.origin, tc.site, got, tc.ok)
		}
	}
}

func TestChart(t *testing.T) {
	start := time.Date(2026, 12, 4, 0, 0, 0, 0, time.UTC)
	c := chart("Unlocks", "unlocks", []int{0, 1, 4, 0}, start, time.Hour)
	if c.Max != 4 || len(c.Bars) != 4 {
		t.Fatalf("chart %+v", c)
	}
	if c.Bars[0].H != 0 || c.Bars[2].H != chartH || c.Bars[1].H != chartH/4 || c.Bars[2].Y != chartPad {
		t.Fatalf("bars %+v", c.Bars)
	}
	if c := chart("x", "x", []int{0, 0}, start, time.Hour); c.Max != 0 || c.Bars[0].H != 0 {
		t.Fatalf("empty chart %+v", c)
	}
}
