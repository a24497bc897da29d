package store_test

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/keygate/keygate/keysvc/store"
)

var t0 = time.Unix(1_700_000_000, 0).UTC()

func alert(sink, key string, created time.Time) store.OutboxItem {
	return store.OutboxItem{Sink: sink, Key: key, EventID: 7, Body: []byte(`{"k":"` + key + `"}`), Created: created}
}

func claimedKeys(items []store.OutboxItem) []string {
	var out []string
	for _, it := range items {
		out = append(out, it.Key)
	}
	return out
}

// TestEnqueueAlerts: a batch is stored whole or not at all, and an item
// whose (sink, key) is stored already is skipped.
func TestEnqueueAlerts(t *testing.T) { forEachBackend(t, testEnqueueAlerts) }

func testEnqueueAlerts(t *testing.T, b backend) {
	good := alert("webhook:a", "k1", t0)
	tests := []struct {
		name        string
		items       []store.OutboxItem
		wantErr     string
		wantPending int64
	}{
		{name: "stores", items: []store.OutboxItem{good, alert("webhook:a", "k2", t0), alert("syslog:b", "k1", t0)}, wantPending: 3},
		{name: "duplicate-skipped", items: []store.OutboxItem{good, good}, wantPending: 1},
		{name: "no-sink", items: []store.OutboxItem{good, alert("", "k2", t0)}, wantErr: "sink and key are required"},
		{name: "no-key", items: []store.OutboxItem{good, alert("webhook:a", "", t0)}, wantErr: "sink and key are required"},
		{name: "bad-json", items: []store.OutboxItem{good, {Sink: "webhook:a", Key: "k2", Body: []byte("{"), Created: t0}}, wantErr: "not valid JSON"},
		{name: "no-time", items: []store.OutboxItem{good, alert("webhook:a", "k2", time.Time{})}, wantErr: "no creation time"},
		{name: "empty", wantPending: 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx := context.Background()
			s := forEachCase(t, b).open(t)
			err := s.EnqueueAlerts(ctx, tt.items)
			if (err != nil) != (tt.wantErr != "") || err != nil && !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("EnqueueAlerts: %v, want %q", err, tt.wantErr)
			}
			st, err := s.OutboxStats(ctx)
			if err != nil {
				t.Fatal(err)
			}
			if st.Pending != tt.wantPending || st.Dead != 0 {
				t.Fatalf("stats %+v, want %d pending (a refused batch stores nothing)", st, tt.wantPending)
			}
		})
	}
}

// TestOutboxLifecycle: claims take due items of the asked sinks, oldest
// first, and lease them; a failure schedules a retry or dead-letters the
// item; a delivered item is gone.
func TestOutboxLifecycle(t *testing.T) { each(t, testOutboxLifecycle) }

func testOutboxLifecycle(t *testing.T, s store.Backend) {
	ctx := context.Background()
	items := []store.OutboxItem{
		alert("webhook:a", "late", t0.Add(2*time.Second)),
		alert("webhook:a", "early", t0),
		alert("syslog:b", "other-sink", t0),
		alert("webhook:a", "future", t0.Add(time.Hour)),
	}
	if err := s.EnqueueAlerts(ctx, items); err != nil {
		t.Fatal(err)
	}
	now := t0.Add(time.Minute)
	lease := 30 * time.Second
	got, err := s.ClaimAlerts(ctx, []string{"webhook:a"}, now, lease, 10)
	if err != nil {
		t.Fatal(err)
	}
	if keys := claimedKeys(got); !slices.Equal(keys, []string{"early", "late"}) {
		t.Fatalf("claimed %v, want the due items of webhook:a, oldest first", keys)
	}
	if got[0].Attempts != 0 || !got[0].Created.Equal(t0) || string(got[0].Body) != `{"k":"early"}` || got[0].EventID != 7 {
		t.Fatalf("claimed item %+v", got[0])
	}
	// Leased: not handed out again until the lease ends.
	if again, err := s.ClaimAlerts(ctx, []string{"webhook:a"}, now.Add(lease-time.Nanosecond), lease, 10); err != nil || len(again) != 0 {
		t.Fatalf("claim during the lease: %v, %v; want none", claimedKeys(again), err)
	}
	// Both leases end together: the first stored goes first.
	if again, err := s.ClaimAlerts(ctx, []string{"webhook:a"}, now.Add(lease), lease, 1); err != nil || !slices.Equal(claimedKeys(again), []string{"late"}) {
		t.Fatalf("claim after the lease, limit 1: %v, %v; want [late]", claimedKeys(again), err)
	}

	early, late := got[0].ID, got[1].ID
	long := strings.Repeat("é", 400) // 800 bytes: kept to 512, on a rune boundary
	retry := now.Add(5 * time.Minute)
	if err := s.AlertFailed(ctx, early, long, retry, false); err != nil {
		t.Fatal(err)
	}
	if err := s.AlertFailed(ctx, late, "gone for good", now, true); err != nil {
		t.Fatal(err)
	}
	if err := s.AlertFailed(ctx, 1<<40, "x", now, false); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("AlertFailed on a missing item: %v, want ErrNotFound", err)
	}
	if st, err := s.OutboxStats(ctx); err != nil || st != (store.OutboxStats{Pending: 3, Dead: 1}) {
		t.Fatalf("stats %+v, %v; want 3 pending, 1 dead", st, err)
	}
	if got, err := s.ClaimAlerts(ctx, []string{"webhook:a"}, retry.Add(-time.Nanosecond), lease, 10); err != nil || len(got) != 0 {
		t.Fatalf("claim before the retry time: %v, %v; want none (the dead letter is never claimed)", claimedKeys(got), err)
	}
	got, err = s.ClaimAlerts(ctx, []string{"webhook:a", "syslog:b"}, retry, lease, 10)
	if err != nil || !slices.Equal(claimedKeys(got), []string{"other-sink", "early"}) {
		t.Fatalf("claim at the retry time: %v, %v; want [other-sink early]", claimedKeys(got), err)
	}
	if e := got[1]; e.Attempts != 1 || len(e.LastErr) > 512 || !strings.HasPrefix(long, e.LastErr) || !strings.HasSuffix(e.LastErr, "é") {
		t.Fatalf("retried item: attempts %d, last error of %d bytes", e.Attempts, len(e.LastErr))
	}
	for _, it := range got {
		if err := s.AlertDelivered(ctx, it.ID); err != nil {
			t.Fatal(err)
		}
	}
	if st, err := s.OutboxStats(ctx); err != nil || st != (store.OutboxStats{Pending: 1, Dead: 1}) {
		t.Fatalf("stats after delivery %+v, %v; want the future item and the dead letter", st, err)
	}
	if _, err := s.ClaimAlerts(ctx, []string{"webhook:a"}, now, 0, 10); err == nil {
		t.Fatal("a claim with no lease was accepted")
	}
}

// TestEventFeed: events after an ID, lowest first, and the last ID.
func TestEventFeed(t *testing.T) { each(t, testEventFeed) }

func testEventFeed(t *testing.T, s store.Backend) {
	ctx := context.Background()
	if id, err := s.LastEventID(ctx); err != nil || id != 0 {
		t.Fatalf("LastEventID of an empty store: %d, %v", id, err)
	}
	var evs []store.VMEvent
	for i := range 5 {
		evs = append(evs, store.VMEvent{Received: t0.Add(time.Duration(i) * time.Second), VM: "vm1", Volume: "v1", Session: "s",
			Kind: "heartbeat", Severity: "info", Data: []byte(fmt.Sprintf(`{"i":%d}`, i))})
	}
	stored, err := s.AddEvents(ctx, evs)
	if err != nil {
		t.Fatal(err)
	}
	got, err := s.EventsAfter(ctx, stored[1].ID, 2)
	if err != nil || len(got) != 2 || got[0].ID != stored[2].ID || got[1].ID != stored[3].ID || string(got[0].Data) != `{"i":2}` {
		t.Fatalf("EventsAfter(%d, 2) = %+v, %v; want events 2 and 3", stored[1].ID, got, err)
	}
	if id, err := s.LastEventID(ctx); err != nil || id != stored[4].ID {
		t.Fatalf("LastEventID = %d, %v; want %d", id, err, stored[4].ID)
	}
	if got, err := s.EventsAfter(ctx, stored[4].ID, 10); err != nil || len(got) != 0 {
		t.Fatalf("EventsAfter the last: %+v, %v", got, err)
	}
	for _, limit := range []int{0, store.MaxEventList + 1} {
		if _, err := s.EventsAfter(ctx, 0, limit); err == nil {
			t.Errorf("EventsAfter with limit %d was accepted", limit)
		}
	}
}

// TestReplicasClaimDisjoint: replicas claiming from one PostgreSQL outbox
// at once never hand out the same item while its lease runs, and together
// they hand out every item.
func TestReplicasClaimDisjoint(t *testing.T) {
	ctx := context.Background()
	a, b, _ := replicas(t)
	const n = 300
	var items []store.OutboxItem
	for i := range n {
		items = append(items, alert("webhook:a", fmt.Sprintf("k%03d", i), t0))
	}
	if err := a.EnqueueAlerts(ctx, items); err != nil {
		t.Fatal(err)
	}
	var (
		wg    sync.WaitGroup
		mu    sync.Mutex
		seen  = map[int64]int{}
		errs  []error
		start = make(chan struct{})
	)
	for w := range 8 {
		s := []store.Backend{a, b}[w%2]
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			for {
				// The lease outlasts the test: an item is handed out once.
				got, err := s.ClaimAlerts(ctx, []string{"webhook:a"}, t0.Add(time.Minute), time.Hour, 7)
				mu.Lock()
				if err != nil {
					errs = append(errs, err)
				}
				for _, it := range got {
					seen[it.ID]++
				}
				mu.Unlock()
				if err != nil || len(got) == 0 {
					return
				}
			}
		}()
	}
	close(start)
	wg.Wait()
	if len(errs) > 0 {
		t.Fatal(errors.Join(errs...))
	}
	for id, k := range seen {
		if k != 1 {
			t.Errorf("item %d handed out %d times under one lease", id, k)
		}
	}
	if len(seen) != n {
		t.Fatalf("%d of %d items handed out", len(seen), n)
	}
}

// TestReplicasEventFeedSkipsNone: a reader following EventsAfter while two
// replicas store events sees every event: no ID commits below one it has
// read already.
func TestReplicasEventFeedSkipsNone(t *testing.T) {
	ctx := context.Background()
	a, b, _ := replicas(t)
	const perWriter, writers = 60, 4
	var wg sync.WaitGroup
	errc := make(chan error, writers)
	for w := range writers {
		s := []store.Backend{a, b}[w%2]
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range perWriter {
				ev := store.VMEvent{Received: t0, VM: fmt.Sprintf("vm%d", w), Volume: "v", Session: "s", Kind: "heartbeat", Severity: "info",
					Data: []byte(fmt.Sprintf(`{"i":%d}`, i))}
				if _, err := s.AddEvents(ctx, []store.VMEvent{ev}); err != nil {
					errc <- err
					return
				}
			}
		}()
	}
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	seen, cursor := map[int64]bool{}, int64(0)
	for finished := false; ; {
		select {
		case <-done:
			finished = true
		default:
		}
		got, err := b.EventsAfter(ctx, cursor, 10)
		if err != nil {
			t.Fatal(err)
		}
		for _, e := range got {
			seen[e.ID] = true
			cursor = e.ID
		}
		if finished && len(got) == 0 {
			break
		}
	}
	close(errc)
	for err := range errc {
		t.Fatal(err)
	}
	all, err := a.ListEvents(ctx, store.EventFilter{Limit: store.MaxEventList})
	if err != nil {
		t.Fatal(err)
	}
	if len(all) != perWriter*writers {
		t.Fatalf("%d events stored, want %d", len(all), perWriter*writers)
	}
	for _, e := range all {
		if !seen[e.ID] {
			t.Errorf("event %d was stored but the feed following along never returned it", e.ID)
		}
	}
}
