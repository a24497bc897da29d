package keysvcsink_test

import (
	"context"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/keygate/keygate/ebpfmon"
	"github.com/keygate/keygate/ebpfmon/keysvcsink"
	"github.com/keygate/keygate/keysvc/api"
)

func TestConvert(t *testing.T) {
	when := time.Date(2026, 11, 27, 23, 0, 0, 0, time.UTC)
	tests := []struct {
		name string
		in   ebpfmon.Event
		want api.Event
	}{
		{"proc mem", ebpfmon.Event{Technique: ebpfmon.ProcMem, Severity: ebpfmon.Critical, TGID: 7, Comm: "gdb", Exe: "/usr/bin/gdb", UID: 1000,
			TargetPID: 9, Path: "/proc/9/mem", Overlap: true, Result: 3, Mode: ebpfmon.ModeDetect, Time: when},
			api.Event{Kind: "proc_mem", Severity: "critical", PID: 7, Comm: "gdb", Exe: "/usr/bin/gdb", TargetPID: 9, Path: "/proc/9/mem", Overlap: true, Mode: "detect"}},
		{"readv over the key", ebpfmon.Event{Technique: ebpfmon.ProcessVMReadv, Severity: ebpfmon.Critical, TGID: 8, TargetPID: 9,
			Addr: 0x7f0000001000, Len: 4096, Overlap: true, OverlapBytes: 4096, Result: -1, Denied: true, Mode: ebpfmon.ModeDeny},
			api.Event{Kind: "process_vm_readv", Severity: "critical", PID: 8, TargetPID: 9, Addr: 0x7f0000001000, Len: 4096, Overlap: true, OverlapBytes: 4096, Denied: true, Mode: "deny"}},
		{"long fields are cut to keysvc's bounds", ebpfmon.Event{Technique: ebpfmon.ProcessVMReadv, Severity: ebpfmon.Warning, Comm: strings.Repeat("c", 80), Exe: strings.Repeat("/é", 800)},
			api.Event{Kind: "process_vm_readv", Severity: "warning", Comm: strings.Repeat("c", 64)}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got := keysvcsink.Convert(tc.in)
			if got.Kind != tc.want.Kind || got.Severity != tc.want.Severity || got.PID != tc.want.PID || got.Comm != tc.want.Comm ||
				got.TargetPID != tc.want.TargetPID || got.Addr != tc.want.Addr || got.Len != tc.want.Len || got.Overlap != tc.want.Overlap ||
				got.OverlapBytes != tc.want.OverlapBytes || got.Denied != tc.want.Denied || got.Mode != tc.want.Mode ||
				got.Path != tc.want.Path {
				t.Errorf("got %+v, want %+v", got, tc.want)
			}
			if got.UID == nil || *got.UID != uint32(tc.in.UID) || got.Result == nil || *got.Result != tc.in.Result {
				t.Errorf("uid %v result %v, want %d and %d", got.UID, got.Result, tc.in.UID, tc.in.Result)
			}
			if tc.in.Time.IsZero() != (got.Time == nil) || (got.Time != nil && !got.Time.Equal(tc.in.Time)) {
				t.Errorf("time %v, want %v", got.Time, tc.in.Time)
			}
			if len(got.Exe) > api.MaxEventText || !utf8.ValidString(got.Exe) || len(got.Message) > api.MaxEventText || !strings.Contains(got.Message, string(tc.in.Technique)) {
				t.Errorf("exe %d bytes, message %q", len(got.Exe), got.Message)
			}
		})
	}
	for _, s := range ebpfmon.Severities() {
		if got := keysvcsink.Convert(ebpfmon.Event{Technique: ebpfmon.Kcore, Severity: s}).Severity; got != string(s) {
			t.Errorf("severity %s became %s", s, got)
		}
	}
}

// poster records batches, the way keysvc would receive them.
type poster struct {
	mu      sync.Mutex
	batches [][]api.Event
	err     error
}

func (p *poster) PostEvents(_ context.Context, evs []api.Event) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.batches = append(p.batches, append([]api.Event(nil), evs...))
	return p.err
}

func TestSink(t *testing.T) {
	tests := []struct {
		name       string
		n          int
		err        error
		wantFailed uint64
		wantSent   int // events in all the posts made
	}{
		{"one", 1, nil, 0, 1},
		{"more than a batch", api.MaxEvents + 5, nil, 0, api.MaxEvents + 5},
		// Critical alerts refused are sent again, four times more.
		{"service refuses", 3, errors.New("403"), 3, 15},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			p := &poster{err: tc.err}
			s := keysvcsink.New(p, 1000)
			for i := 0; i < tc.n; i++ {
				if err := s.Write(ebpfmon.Event{Technique: ebpfmon.PtraceAttach, Severity: ebpfmon.Critical, TGID: i}); err != nil {
					t.Fatal(err)
				}
			}
			s.Close()
			total := 0
			for _, b := range p.batches {
				if len(b) > api.MaxEvents {
					t.Errorf("batch of %d, above keysvc's %d", len(b), api.MaxEvents)
				}
				total += len(b)
			}
			if total != tc.wantSent || s.Failed() != tc.wantFailed || s.Dropped() != 0 {
				t.Errorf("posted %d, failed %d, dropped %d; want %d, %d, 0", total, s.Failed(), s.Dropped(), tc.wantSent, tc.wantFailed)
			}
		})
	}
}

// blockingPoster holds every post until released, as a hung key service would.
type blockingPoster struct {
	release chan struct{}
	posted  chan int
}

func (p *blockingPoster) PostEvents(_ context.Context, evs []api.Event) error {
	p.posted <- len(evs)
	<-p.release
	return nil
}

func TestSinkFullQueueDrops(t *testing.T) {
	p := &blockingPoster{release: make(chan struct{}), posted: make(chan int, 10)}
	s := keysvcsink.New(p, 1)
	e := ebpfmon.Event{Technique: ebpfmon.ProcMem, Severity: ebpfmon.Critical}
	if err := s.Write(e); err != nil {
		t.Fatal(err)
	}
	<-p.posted // the first event is being posted, and the post hangs
	if err := s.Write(e); err != nil {
		t.Fatalf("the queue of one had room: %v", err)
	}
	if err := s.Write(e); err == nil || !strings.Contains(err.Error(), "dropped") {
		t.Errorf("write to a full queue: %v, want a drop", err)
	}
	if s.Dropped() != 1 {
		t.Errorf("dropped %d, want 1", s.Dropped())
	}
	close(p.release)
	s.Close()
}

// stalledPoster takes no batch until release is closed, the way a slow or
// flooded key service answers, then records what it is given.
type stalledPoster struct {
	release chan struct{}
	mu      sync.Mutex
	got     []api.Event
}

func (p *stalledPoster) PostEvents(ctx context.Context, evs []api.Event) error {
	<-p.release
	p.mu.Lock()
	defer p.mu.Unlock()
	p.got = append(p.got, evs...)
	return nil
}

// TestFloodKeepsCritical: a flood of warnings (which anyone can raise: the
// monitor reports a perf_event_open on the key holder whatever it returns)
// fills the queue while the key service is slow; a critical alert written
// then must still reach the key service, where the operator looks, and
// not be the one dropped. Warnings may be.
func TestFloodKeepsCritical(t *testing.T) {
	p := &stalledPoster{release: make(chan struct{})}
	s := keysvcsink.New(p, 16)
	for i := range 200 {
		s.Write(ebpfmon.Event{Technique: ebpfmon.PerfEventOpen, Severity: ebpfmon.Warning, TGID: 1000 + i})
	}
	if err := s.Write(ebpfmon.Event{Technique: ebpfmon.ProcMem, Severity: ebpfmon.Critical, TGID: 7}); err != nil {
		t.Errorf("the critical alert was refused: %v", err)
	}
	close(p.release)
	s.Close()
	n := 0
	for _, e := range p.got {
		if e.Severity == "critical" && e.PID == 7 {
			n++
		}
	}
	if n != 1 {
		t.Fatalf("the critical alert reached the key service %d times after a flood of warnings (%d events posted, %d dropped), want once", n, len(p.got), s.Dropped())
	}
	if s.Dropped() == 0 {
		t.Errorf("no warning dropped: the queue of 16 never filled, so the test shows nothing")
	}
}

// refusingPoster refuses its first n batches (a 429 from keysvc's rate
// limit, which a flood's own batches spent), then records.
type refusingPoster struct {
	mu  sync.Mutex
	n   int
	got []api.Event
}

func (p *refusingPoster) PostEvents(ctx context.Context, evs []api.Event) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.n > 0 {
		p.n--
		return errors.New("429 Too Many Requests")
	}
	p.got = append(p.got, evs...)
	return nil
}

// TestRefusedCriticalSentAgain: a batch the key service refuses is let go
// for its warnings, but its critical alerts are sent again (after a pause
// in which the service's rate limit refills), a bounded number of times.
func TestRefusedCriticalSentAgain(t *testing.T) {
	for _, tc := range []struct {
		name    string
		refuse  int
		posted  int // times the critical alert reached the service
		warning int // times the warning did
	}{
		{"refused twice", 2, 1, 1},
		{"refused always", 1000, 0, 0},
		{"accepted", 0, 1, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := &refusingPoster{n: tc.refuse}
			s := keysvcsink.New(p, 16)
			s.Write(ebpfmon.Event{Technique: ebpfmon.PerfEventOpen, Severity: ebpfmon.Warning, TGID: 8})
			s.Write(ebpfmon.Event{Technique: ebpfmon.ProcMem, Severity: ebpfmon.Critical, TGID: 7})
			s.Close()
			crit, warn := 0, 0
			for _, e := range p.got {
				switch e.PID {
				case 7:
					crit++
				case 8:
					warn++
				}
			}
			if crit != tc.posted || warn > tc.warning {
				t.Errorf("critical posted %d times, warning %d; want %d and at most %d (failed %d)", crit, warn, tc.posted, tc.warning, s.Failed())
			}
			if tc.posted == 0 && s.Failed() == 0 {
				t.Error("a critical alert never accepted is not counted as failed")
			}
		})
	}
}
