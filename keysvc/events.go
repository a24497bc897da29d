package keysvc

import (
	"encoding/json"
	"fmt"
	"log/slog"
	"math"
	"net/http"
	"strconv"
	"time"
	"unicode/utf8"

	"github.com/keygate/keygate/keysvc/api"
	"github.com/keygate/keygate/keysvc/audit"
	"github.com/keygate/keygate/keysvc/store"
)

// metricKinds are the kinds counted under their own name in
// keysvc_vm_events_total: the heartbeat and the monitor's techniques. Any
// other kind is counted as "other", so that a VM cannot grow the metric's
// label set without bound.
var metricKinds = map[string]bool{api.KindHeartbeat: true,
	"process_vm_readv": true, "process_vm_writev": true, "ptrace_attach": true, "ptrace_seize": true,
	"ptrace_peek": true, "ptrace_poke": true, "proc_mem": true, "proc_environ": true, "proc_maps": true,
	"pidfd_getfd": true, "perf_event_open": true, "kcore": true, "dev_mem": true,
	"events_lost": true, "bpf_fd": true, "bpf_prog_load": true}

func metricKind(k string) string {
	if metricKinds[k] {
		return k
	}
	return "other"
}

// checkEvent bounds what a VM may report: the event is stored, warning and
// critical ones go into the audit chain, and its kind and severity become
// metric labels.
func checkEvent(i int, e api.Event) *httpError {
	bad := func(format string, args ...any) *httpError {
		return errorf(http.StatusBadRequest, "see docs/protocol.md, POST /v1/events", "event %d: %s", i, fmt.Sprintf(format, args...))
	}
	switch {
	case !isToken(e.Kind, api.MaxEventKind):
		return bad("kind %q must be 1-%d bytes of a-z, 0-9, '_', '.', '-'", truncate(e.Kind, 16), api.MaxEventKind)
	case store.SeverityRank(e.Severity) < 0:
		return bad("severity %q is not info, warning or critical", truncate(e.Severity, 16))
	case e.Time != nil && (e.Time.Year() < 2000 || e.Time.Year() > 9999):
		return bad("time %s is out of range", e.Time.UTC().Format(time.RFC3339))
	case e.PID < 0 || e.PID > math.MaxInt32:
		return bad("pid %d is out of range", e.PID)
	case e.TargetPID < 0 || e.TargetPID > math.MaxInt32:
		return bad("target_pid %d is out of range", e.TargetPID)
	case len(e.Comm) > api.MaxEventComm || !utf8.ValidString(e.Comm):
		return bad("comm must be at most %d bytes of UTF-8", api.MaxEventComm)
	case len(e.Exe) > api.MaxEventText || !utf8.ValidString(e.Exe):
		return bad("exe must be at most %d bytes of UTF-8", api.MaxEventText)
	case len(e.Path) > api.MaxEventText || !utf8.ValidString(e.Path):
		return bad("path must be at most %d bytes of UTF-8", api.MaxEventText)
	case len(e.Message) > api.MaxEventText || !utf8.ValidString(e.Message):
		return bad("message must be at most %d bytes of UTF-8", api.MaxEventText)
	case e.Mode != "" && !isToken(e.Mode, api.MaxEventMode):
		return bad("mode %q must be at most %d bytes of a-z, 0-9, '_', '.', '-'", truncate(e.Mode, 16), api.MaxEventMode)
	case e.OverlapBytes > 0 && !e.Overlap:
		return bad("overlap_bytes without overlap")
	}
	return nil
}

// isToken reports whether s is 1 to max bytes of a-z 0-9 _ . -.
func isToken(s string, max int) bool {
	if s == "" || len(s) > max {
		return false
	}
	for _, c := range []byte(s) {
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '_' || c == '.' || c == '-') {
			return false
		}
	}
	return true
}

func truncate(s string, n int) string {
	if len(s) > n {
		s = s[:n]
		for len(s) > 0 && !utf8.ValidString(s) {
			s = s[:len(s)-1]
		}
		return s + "…"
	}
	return s
}

// handleEvents is POST /v1/events. Every event of an accepted batch is
// stored (all or none: a failure answers 500 and the VM sends the batch
// again) and counted; warning and critical ones are then audited, naming the
// stored event's ID. Events are accepted from a revoked session too (an
// attack after a revoke is worth knowing about); the answer tells the VM its
// state.
func (s *Server) handleEvents(w http.ResponseWriter, r *http.Request) {
	var req api.EventsRequest
	if e := readJSON(w, r, api.MaxEventsBody, &req); e != nil {
		writeError(w, e)
		return
	}
	c, err := s.parseSession(req.Session)
	if err != nil {
		badSession(w)
		return
	}
	if len(req.Events) > api.MaxEvents {
		writeError(w, errorf(http.StatusRequestEntityTooLarge, "send events in batches", "%d events, more than %d", len(req.Events), api.MaxEvents))
		return
	}
	now := s.now()
	rows := make([]store.VMEvent, len(req.Events))
	for i, e := range req.Events {
		if he := checkEvent(i, e); he != nil {
			writeError(w, he)
			return
		}
		data, err := json.Marshal(e)
		if err != nil {
			s.internal(w, "encode event", err)
			return
		}
		rows[i] = store.VMEvent{Received: now, VM: c.VM, Volume: c.Volume, Session: c.ID, Kind: e.Kind, Severity: e.Severity, Data: data}
	}
	var stored []store.VMEvent
	if len(rows) > 0 {
		if stored, err = s.st.AddEvents(r.Context(), rows); err != nil {
			s.internal(w, "store events", err)
			return
		}
		s.bell.ring()
		// Queued before the answer: a VM that is not answered 200 sends
		// the batch again, so no alert is lost between the two writes.
		if err := s.queueAlerts(r.Context(), stored); err != nil {
			s.internal(w, "queue alerts", err)
			return
		}
	}
	for i, e := range req.Events {
		s.metrics.events.WithLabelValues(e.Severity, metricKind(e.Kind)).Inc()
		if store.SeverityRank(e.Severity) < store.SeverityRank("warning") {
			continue // stored and counted; info (heartbeats among them) would drown the chain
		}
		id := stored[i].ID
		s.record(r.Context(), audit.Event{Actor: "vm:" + c.VM, Action: audit.ActionAlert, Subject: c.Volume,
			Details: audit.Alert{Session: c.ID, EventID: id, Kind: e.Kind, Severity: e.Severity, PID: e.PID, Comm: e.Comm,
				Exe: e.Exe, UID: e.UID, TargetPID: e.TargetPID, Overlap: e.Overlap, Result: e.Result, Denied: e.Denied, Mode: e.Mode}})
		s.log.Warn("vm event", slog.Int64("id", id), slog.String("vm", c.VM), slog.String("kind", e.Kind),
			slog.String("severity", e.Severity), slog.Int("pid", e.PID), slog.String("comm", e.Comm),
			slog.String("exe", e.Exe), slog.Int("target_pid", e.TargetPID), slog.Bool("overlap", e.Overlap), slog.String("mode", e.Mode))
	}
	state, err := s.sessionState(r, c)
	if err != nil {
		s.internal(w, "read session state", err)
		return
	}
	writeJSON(w, http.StatusOK, api.EventsResponse{Accepted: len(req.Events), State: state})
}

// adminListEvents is GET /v1/admin/events?vm=&since=&severity=&kind=&limit=:
// stored events, newest first. since is an RFC 3339 time or a duration
// back from now ("1h"); severity selects that severity and those above it.
func (s *Server) adminListEvents(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	f := store.EventFilter{VM: q.Get("vm"), Kind: q.Get("kind"), MinSeverity: q.Get("severity"), Limit: api.DefaultEventList}
	if f.MinSeverity != "" && store.SeverityRank(f.MinSeverity) < 0 {
		writeError(w, errorf(http.StatusBadRequest, "", "severity %q is not info, warning or critical", truncate(f.MinSeverity, 16)))
		return
	}
	if v := q.Get("since"); v != "" {
		t, err := parseSince(v, s.now())
		if err != nil {
			writeError(w, errorf(http.StatusBadRequest, `give an RFC 3339 time ("2026-11-27T12:00:00Z") or a duration back from now ("90m", "24h")`, "since: %v", err))
			return
		}
		f.Since = t
	}
	if v := q.Get("limit"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 || n > store.MaxEventList {
			writeError(w, errorf(http.StatusBadRequest, "", "limit must be a number from 1 to %d", store.MaxEventList))
			return
		}
		f.Limit = n
	}
	evs, err := s.st.ListEvents(r.Context(), f)
	if err != nil {
		s.internal(w, "list events", err)
		return
	}
	out := make([]api.EventRecord, 0, len(evs))
	for _, ev := range evs {
		out = append(out, eventRecord(ev))
	}
	writeJSON(w, http.StatusOK, out)
}

// parseSince reads an RFC 3339 time, or a positive duration back from now.
func parseSince(v string, now time.Time) (time.Time, error) {
	if t, err := time.Parse(time.RFC3339Nano, v); err == nil {
		return t, nil
	}
	d, err := time.ParseDuration(v)
	if err != nil || d <= 0 {
		return time.Time{}, fmt.Errorf("%q is neither an RFC 3339 time nor a positive duration", truncate(v, 40))
	}
	return now.Add(-d), nil
}
