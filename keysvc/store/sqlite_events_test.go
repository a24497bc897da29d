package store_test

import (
	"context"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/keygate/keygate/keysvc/store"
)

func TestEvents(t *testing.T) { forEachBackend(t, testEvents) }

func testEvents(t *testing.T, b backend) {
	ctx := context.Background()
	s := b.open(t)
	t0 := time.Date(2026, 11, 27, 12, 0, 0, 0, time.UTC)
	ev := func(vm, kind, sev string, at time.Duration) store.VMEvent {
		return store.VMEvent{Received: t0.Add(at), VM: vm, Volume: vm + "-vol", Session: "s-" + vm, Kind: kind, Severity: sev,
			Data: fmt.Appendf(nil, `{"kind":%q,"severity":%q}`, kind, sev)}
	}
	added, err := s.AddEvents(ctx, []store.VMEvent{
		ev("a", "heartbeat", "info", 0), ev("a", "ptrace_attach", "critical", time.Second),
		ev("b", "proc_maps", "info", 2*time.Second), ev("b", "proc_mem", "warning", 3*time.Second),
	})
	if err != nil {
		t.Fatal(err)
	}
	for i := 1; i < len(added); i++ {
		if added[i].ID <= added[i-1].ID {
			t.Fatalf("IDs %d then %d: want increasing", added[i-1].ID, added[i].ID)
		}
	}
	ids := func(evs []store.VMEvent) []int64 {
		var out []int64
		for _, e := range evs {
			out = append(out, e.ID)
		}
		return out
	}
	id := ids(added)

	for _, tc := range []struct {
		name string
		f    store.EventFilter
		want []int64
	}{
		{"all, newest first", store.EventFilter{}, []int64{id[3], id[2], id[1], id[0]}},
		{"vm", store.EventFilter{VM: "a"}, []int64{id[1], id[0]}},
		{"unknown vm", store.EventFilter{VM: "nobody"}, nil},
		{"since", store.EventFilter{Since: t0.Add(2 * time.Second)}, []int64{id[3], id[2]}},
		{"at least warning", store.EventFilter{MinSeverity: "warning"}, []int64{id[3], id[1]}},
		{"at least critical", store.EventFilter{MinSeverity: "critical"}, []int64{id[1]}},
		{"at least info", store.EventFilter{MinSeverity: "info"}, []int64{id[3], id[2], id[1], id[0]}},
		{"kind", store.EventFilter{Kind: "proc_maps"}, []int64{id[2]}},
		{"limit", store.EventFilter{Limit: 2}, []int64{id[3], id[2]}},
		{"combined", store.EventFilter{VM: "b", MinSeverity: "warning", Since: t0}, []int64{id[3]}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := s.ListEvents(ctx, tc.f)
			if err != nil {
				t.Fatal(err)
			}
			if !slices.Equal(ids(got), tc.want) {
				t.Fatalf("got IDs %v, want %v", ids(got), tc.want)
			}
		})
	}

	t.Run("round trip", func(t *testing.T) {
		got, err := s.ListEvents(ctx, store.EventFilter{Kind: "proc_mem"})
		if err != nil || len(got) != 1 {
			t.Fatalf("got %v, %v", got, err)
		}
		want := added[3]
		g := got[0]
		if g.ID != want.ID || !g.Received.Equal(want.Received) || g.VM != want.VM || g.Volume != want.Volume ||
			g.Session != want.Session || g.Kind != want.Kind || g.Severity != want.Severity || string(g.Data) != string(want.Data) {
			t.Fatalf("stored %+v, read back %+v", want, g)
		}
	})

	for _, tc := range []struct {
		name string
		ev   store.VMEvent
	}{
		{"no vm", func() store.VMEvent { e := ev("a", "k", "info", 0); e.VM = ""; return e }()},
		{"no kind", ev("a", "", "info", 0)},
		{"bad severity", ev("a", "k", "fatal", 0)},
		{"no time", func() store.VMEvent { e := ev("a", "k", "info", 0); e.Received = time.Time{}; return e }()},
		{"bad json", func() store.VMEvent { e := ev("a", "k", "info", 0); e.Data = []byte("{"); return e }()},
	} {
		t.Run("refused/"+tc.name, func(t *testing.T) {
			// A bad event in a batch stores none of the batch.
			if _, err := s.AddEvents(ctx, []store.VMEvent{ev("c", "k", "info", 0), tc.ev}); err == nil {
				t.Fatal("stored")
			}
			if got, _ := s.ListEvents(ctx, store.EventFilter{VM: "c"}); len(got) != 0 {
				t.Fatalf("%d events of the refused batch stored", len(got))
			}
		})
	}
	for _, f := range []store.EventFilter{{Limit: -1}, {Limit: store.MaxEventList + 1}, {MinSeverity: "loud"}} {
		if _, err := s.ListEvents(ctx, f); err == nil {
			t.Errorf("ListEvents(%+v): no error", f)
		}
	}

	t.Run("purge", func(t *testing.T) {
		n, err := s.PurgeEvents(ctx, t0.Add(2*time.Second))
		if err != nil || n != 2 {
			t.Fatalf("purged %d (%v), want 2", n, err)
		}
		got, _ := s.ListEvents(ctx, store.EventFilter{})
		if !slices.Equal(ids(got), []int64{id[3], id[2]}) {
			t.Fatalf("left %v", ids(got))
		}
	})

	t.Run("kept across reopen", func(t *testing.T) {
		s.Close()
		s2 := b.open(t)
		got, err := s2.ListEvents(ctx, store.EventFilter{})
		if err != nil || len(got) != 2 {
			t.Fatalf("after reopen: %d events, %v", len(got), err)
		}
		// IDs are never reused, even after a purge.
		more, err := s2.AddEvents(ctx, []store.VMEvent{ev("a", "k", "info", 4*time.Second)})
		if err != nil || more[0].ID <= id[3] {
			t.Fatalf("new ID %v (%v), want above %d", more, err, id[3])
		}
	})
}
