package keysvc

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/keygate/keygate/keysvc/api"
	"github.com/keygate/keygate/keysvc/store"
)

// The live event stream, GET /v1/admin/events/stream (Server-Sent Events):
// every event stored from the moment it connects, as one JSON `data:` line
// (an api.EventRecord) with its ID as the SSE `id:`, so that a client that
// reconnects with Last-Event-ID (or ?after=ID) misses none.
//
// It reads the store, not this process's memory, so that an event another
// replica accepted is streamed too: a stream wakes on each batch this
// replica stores (the bell) and polls every streamPoll for the others'.

// Stream timing.
const (
	streamPoll      = 500 * time.Millisecond // the bound on an event's delay from another replica
	streamKeepalive = 15 * time.Second       // an SSE comment, so that proxies keep the connection
	streamBatch     = 200                    // events read per query
)

// bell wakes every waiter when rung.
type bell struct {
	mu sync.Mutex
	ch chan struct{}
}

func (b *bell) wait() <-chan struct{} {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.ch == nil {
		b.ch = make(chan struct{})
	}
	return b.ch
}

func (b *bell) ring() {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.ch != nil {
		close(b.ch)
		b.ch = nil
	}
}

// StopStreams ends every event stream (Service.Shutdown calls it first: an
// open stream would otherwise hold the server's shutdown until its
// deadline).
func (s *Server) StopStreams() { s.stopStreams() }

// eventRecord is how the admin API shows a stored event.
func eventRecord(ev store.VMEvent) api.EventRecord {
	rec := api.EventRecord{ID: ev.ID, Received: ev.Received, VM: ev.VM, Volume: ev.Volume, SessionID: ev.Session}
	if err := json.Unmarshal(ev.Data, &rec.Event); err != nil {
		// Stored by this service after checkEvent; keep what the row says.
		rec.Event = api.Event{Kind: ev.Kind, Severity: ev.Severity, Message: "(stored event does not decode: " + err.Error() + ")"}
	}
	return rec
}

func (s *Server) adminStreamEvents(w http.ResponseWriter, r *http.Request) {
	if s.feed == nil {
		writeError(w, errorf(http.StatusNotImplemented, "use GET /v1/admin/events", "this store cannot stream events"))
		return
	}
	after, he := streamStart(r)
	if he != nil {
		writeError(w, he)
		return
	}
	ctx, cancel := context.WithCancel(r.Context())
	defer cancel()
	stop := context.AfterFunc(s.streams, cancel)
	defer stop()
	if after < 0 { // no resume point: from now on
		id, err := s.feed.LastEventID(ctx)
		if err != nil {
			s.internal(w, "read the last event", err)
			return
		}
		after = id
	}
	// A stream opened with a dashboard session ends with the session
	// (logout, expiry); one opened with the token or a certificate runs on.
	bySession := !s.checkAdmin(r) && s.adminCert(r) == ""
	rc := http.NewResponseController(w)
	// The admin listener's write timeout is for requests, not streams.
	if err := rc.SetWriteDeadline(time.Time{}); err != nil {
		s.log.Debug("event stream: cannot lift the write deadline", slog.Any("err", err))
	}
	h := w.Header()
	h.Set("Content-Type", "text/event-stream")
	h.Set("Cache-Control", "no-store")
	h.Set("X-Accel-Buffering", "no")
	w.WriteHeader(http.StatusOK)
	fmt.Fprintf(w, "retry: 1000\n: keygate events after %d\n\n", after)
	if rc.Flush() != nil {
		return
	}
	s.metrics.streams.Inc()
	defer s.metrics.streams.Dec()
	poll := time.NewTicker(streamPoll)
	defer poll.Stop()
	lastWrite := time.Now()
	for {
		if bySession && !s.ui.SessionLive(r) {
			fmt.Fprint(w, "event: logout\ndata: {\"error\":\"the dashboard session ended; log in again\"}\n\n")
			rc.Flush()
			return
		}
		wake := s.bell.wait()
		evs, err := s.feed.EventsAfter(ctx, after, streamBatch)
		if err != nil {
			if ctx.Err() == nil {
				s.log.Warn("event stream: read events", slog.Any("err", err))
				fmt.Fprintf(w, "event: error\ndata: {\"error\":\"the key service could not read its events; reconnect\"}\n\n")
				rc.Flush()
			}
			return
		}
		for _, ev := range evs {
			b, err := json.Marshal(eventRecord(ev))
			if err != nil {
				continue
			}
			// json.Marshal escapes no newline in a string, so one event is
			// one data: line.
			fmt.Fprintf(w, "id: %d\ndata: %s\n\n", ev.ID, b)
			after = ev.ID
		}
		if len(evs) > 0 {
			if rc.Flush() != nil {
				return
			}
			lastWrite = time.Now()
			if len(evs) == streamBatch {
				continue
			}
		}
		if time.Since(lastWrite) >= streamKeepalive {
			fmt.Fprint(w, ": keepalive\n\n")
			if rc.Flush() != nil {
				return
			}
			lastWrite = time.Now()
		}
		select {
		case <-ctx.Done():
			return
		case <-wake:
		case <-poll.C:
		}
	}
}

// streamStart is where a stream resumes: after the Last-Event-ID header or
// the after parameter, or -1 for "from now on".
func streamStart(r *http.Request) (int64, *httpError) {
	v := strings.TrimSpace(r.Header.Get("Last-Event-ID"))
	if v == "" {
		v = r.URL.Query().Get("after")
	}
	if v == "" {
		return -1, nil
	}
	n, err := strconv.ParseInt(v, 10, 64)
	if err != nil || n < 0 {
		return 0, errorf(http.StatusBadRequest, "give the id of the last event received", "Last-Event-ID %q is not an event id", truncate(v, 24))
	}
	return n, nil
}
