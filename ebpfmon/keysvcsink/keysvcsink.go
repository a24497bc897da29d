// Package keysvcsink carries monitor events to the key service's
// POST /v1/events: Convert maps an ebpfmon.Event onto the wire type
// (keysvc/api), and Sink batches them to a Poster (the boot flow's authenticated client). It
// owns the mapping only; keysvc/api owns the wire type and its limits.
package keysvcsink

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"

	"github.com/keygate/keygate/ebpfmon"
	"github.com/keygate/keygate/keysvc/api"
)

// Convert maps a monitor event onto the key service's wire type (keysvc/api), field for field.
// The kind is the technique and the severity is kept as is (both
// vocabularies are info, warning, critical); texts are cut to keysvc's
// bounds, and the message repeats the event in one line for people.
func Convert(e ebpfmon.Event) api.Event {
	uid := uint32(e.UID)
	result := e.Result
	ev := api.Event{
		Kind:         string(e.Technique),
		Severity:     string(e.Severity),
		PID:          e.TGID,
		Comm:         cut(e.Comm, api.MaxEventComm),
		Exe:          cut(e.Exe, api.MaxEventText),
		UID:          &uid,
		TargetPID:    e.TargetPID,
		Addr:         e.Addr,
		Len:          e.Len,
		Overlap:      e.Overlap,
		OverlapBytes: e.OverlapBytes,
		Path:         cut(e.Path, api.MaxEventText),
		Result:       &result,
		Denied:       e.Denied,
		Mode:         string(e.Mode),
		Message:      cut(e.String(), api.MaxEventText),
	}
	if !e.Time.IsZero() {
		t := e.Time
		ev.Time = &t
	}
	if !e.Overlap {
		ev.OverlapBytes = 0 // keysvc refuses overlap_bytes without overlap
	}
	return ev
}

// cut shortens s to at most n bytes without splitting a UTF-8 sequence,
// since keysvc refuses an event whose text is not valid UTF-8.
func cut(s string, n int) string {
	if len(s) <= n {
		return strings.ToValidUTF8(s, "?")
	}
	s = s[:n]
	for len(s) > 0 && !utf8.ValidString(s) {
		s = s[:len(s)-1]
	}
	return s
}

// Poster sends a batch to POST /v1/events under the VM's session.
type Poster interface {
	PostEvents(ctx context.Context, events []api.Event) error
}

// Sink queues events and posts them in batches of at most keysvc.MaxEvents.
// Write never blocks: when the queue is full the event is counted in
// Dropped, so a slow key service cannot stall the monitor. Critical events
// have a queue of their own, posted first, so that a flood of warnings
// (which anyone can raise) cannot crowd out the alert it was raised to
// hide.
type Sink struct {
	p       Poster
	q       chan api.Event
	crit    chan api.Event
	dropped atomic.Uint64
	failed  atomic.Uint64
	done    chan struct{}
	wg      sync.WaitGroup
	timeout time.Duration
}

// New starts a Sink posting to p; queue bounds the events waiting.
func New(p Poster, queue int) *Sink {
	if queue <= 0 {
		queue = 1024
	}
	s := &Sink{p: p, q: make(chan api.Event, queue), crit: make(chan api.Event, queue), done: make(chan struct{}), timeout: 10 * time.Second}
	s.wg.Add(1)
	go s.run()
	return s
}

func (s *Sink) Write(e ebpfmon.Event) error {
	q := s.q
	if e.Severity == ebpfmon.Critical {
		q = s.crit
	}
	select {
	case q <- Convert(e):
		return nil
	default:
		s.dropped.Add(1)
		return fmt.Errorf("keysvc event queue full: event dropped (the key service is slow or unreachable)")
	}
}

// Dropped counts events lost to a full queue; Failed counts events in
// batches the key service did not accept.
func (s *Sink) Dropped() uint64 { return s.dropped.Load() }
func (s *Sink) Failed() uint64  { return s.failed.Load() }

func (s *Sink) run() {
	defer s.wg.Done()
	for {
		var batch []api.Event
		select {
		case e := <-s.crit:
			batch = append(batch, e)
		case e := <-s.q:
			batch = append(batch, e)
		case <-s.done:
			// Flush what is queued, critical events first, then stop.
			for {
				batch = s.fill(batch)
				if len(batch) == 0 {
					return
				}
				s.post(batch)
				batch = nil
			}
		}
		s.post(s.fill(batch))
	}
}

// fill adds queued events to batch up to api.MaxEvents, critical ones
// first.
func (s *Sink) fill(batch []api.Event) []api.Event {
	for _, q := range []chan api.Event{s.crit, s.q} {
	more:
		for len(batch) < api.MaxEvents {
			select {
			case e := <-q:
				batch = append(batch, e)
			default:
				break more
			}
		}
	}
	return batch
}

// A batch the key service refuses (or that does not reach it) is let go
// for its warnings and below; its critical alerts are sent again, up to
// criticalRetries times, with pauses from retryPause doubling (3.75 s in
// all), in which the service's per-VM rate limit refills: a flood's own
// batches may have spent it just before the alert came. All the tries of
// one batch share its timeout, so that a key service that does not answer
// holds the sink (and a lock's last flush) no longer than before.
const (
	criticalRetries = 4
	retryPause      = 250 * time.Millisecond
)

func (s *Sink) post(batch []api.Event) {
	ctx, cancel := context.WithTimeout(context.Background(), s.timeout)
	defer cancel()
	pause := retryPause
	for try := 0; ; try++ {
		if s.p.PostEvents(ctx, batch) == nil {
			return
		}
		var crit []api.Event
		for _, e := range batch {
			if e.Severity == string(ebpfmon.Critical) {
				crit = append(crit, e)
			}
		}
		s.failed.Add(uint64(len(batch) - len(crit)))
		if len(crit) == 0 || try == criticalRetries {
			s.failed.Add(uint64(len(crit)))
			return
		}
		batch = crit
		select {
		case <-time.After(pause):
		case <-ctx.Done():
			s.failed.Add(uint64(len(crit)))
			return
		}
		pause *= 2
	}
}

// Close posts what is queued and stops.
func (s *Sink) Close() error {
	close(s.done)
	s.wg.Wait()
	return nil
}
