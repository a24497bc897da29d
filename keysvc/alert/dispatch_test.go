package alert

import (
	"context"
	"log/slog"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	promtest "github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/keygate/keygate/keysvc/store"
)

type clock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *clock) now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.t }
func (c *clock) add(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

// TestDeadLetters: an alert no receiver takes is retried with backoff
// until it is older than the dead-letter age, then kept as a dead letter,
// counted, and no longer tried.
func TestDeadLetters(t *testing.T) {
	st, err := store.OpenSQLite(context.Background(), t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	down := "http://" + ln.Addr().String() + "/hook"
	ln.Close() // nothing listens: every try fails
	w, err := NewWebhook(1, down, []byte("sixteen byte key"), nil)
	if err != nil {
		t.Fatal(err)
	}
	c := &clock{t: time.Date(2026, 12, 1, 0, 0, 0, 0, time.UTC)}
	const age = 72 * time.Hour
	d, err := NewDispatcher(st, Config{Sinks: []Sink{w}, DeadLetterAge: age, Now: c.now, Log: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if err := d.Enqueue(ctx, []Alert{{EventID: 1, Key: "k1", Severity: "critical", Body: []byte(`{"event":{}}`)},
		{EventID: 2, Key: "k2", Severity: "info", Body: []byte(`{}`)}}); err != nil {
		t.Fatal(err)
	}
	ids := []string{w.ID()}
	attempts := 0
	for c.now().Sub(time.Date(2026, 12, 1, 0, 0, 0, 0, time.UTC)) < age+maxBackoff*2 {
		d.round(ctx, ids)
		attempts = int(promtest.ToFloat64(d.deliveries.WithLabelValues("webhook-1", "error")))
		c.add(maxBackoff)
	}
	st2, err := st.OutboxStats(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if st2.Pending != 0 || st2.Dead != 1 || promtest.ToFloat64(d.dead) != 1 || promtest.ToFloat64(d.deliveries.WithLabelValues("webhook-1", "dead")) != 1 {
		t.Fatalf("after the dead-letter age: %+v, dead gauge %v; want 0 pending and 1 dead letter (the info event is no alert)", st2, promtest.ToFloat64(d.dead))
	}
	if attempts < 2 {
		t.Fatalf("%d failed attempts before the dead letter; want retries", attempts)
	}
	c.add(24 * time.Hour)
	d.round(ctx, ids)
	if n := promtest.ToFloat64(d.deliveries.WithLabelValues("webhook-1", "dead")) + promtest.ToFloat64(d.deliveries.WithLabelValues("webhook-1", "error")); int(n) != attempts+1 {
		t.Fatal("a dead letter was tried again")
	}
}

func TestBackoff(t *testing.T) {
	for _, tc := range []struct {
		n        int
		min, max time.Duration
	}{
		{1, 800 * time.Millisecond, time.Second},
		{2, 1600 * time.Millisecond, 2 * time.Second},
		{9, 200 * time.Second, 256 * time.Second},
		{100, 4 * time.Minute, maxBackoff},
	} {
		for range 20 {
			if b := Backoff(tc.n); b < tc.min || b > tc.max {
				t.Fatalf("Backoff(%d) = %v, want %v..%v", tc.n, b, tc.min, tc.max)
			}
		}
	}
}

func TestSinkConfig(t *testing.T) {
	for _, tc := range []struct {
		name string
		make func() error
	}{
		{"webhook not a URL", func() error { _, err := NewWebhook(1, "ftp://x/y", []byte("k"), nil); return err }},
		{"webhook no secret", func() error { _, err := NewWebhook(1, "https://x/y", nil, nil); return err }},
		{"syslog udp", func() error { _, err := NewSyslog(1, "udp://h:514", nil); return err }},
		{"syslog no port", func() error { _, err := NewSyslog(1, "tcp://h", nil); return err }},
		{"bad severity", func() error { _, err := NewDispatcher(nil, Config{MinSeverity: "loud"}); return err }},
	} {
		if tc.make() == nil {
			t.Errorf("%s: accepted", tc.name)
		}
	}
	w, _ := NewWebhook(1, "https://user:pw@x/y?token=secret", []byte("k"), nil)
	if err := w.Deliver(context.Background(), Delivery{Body: []byte(`{}`)}); err == nil || containsAny(err.Error(), "pw", "secret") {
		t.Fatalf("error %v names the URL's secrets", err)
	}
}

func containsAny(s string, subs ...string) bool {
	for _, x := range subs {
		if strings.Contains(s, x) {
			return true
		}
	}
	return false
}
