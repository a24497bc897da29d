package keysvc

import (
	"context"
	"crypto"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net/http"
	"sync"
	"time"

	pb "github.com/google/go-tpm-tools/proto/attest"
	"google.golang.org/protobuf/proto"

	"github.com/keygate/keygate/attest"
	"github.com/keygate/keygate/keysvc/api"
	"github.com/keygate/keygate/keysvc/audit"
	"github.com/keygate/keygate/keysvc/store"
)

// Continuous attestation (issue 15). A serving VM quotes its PCRs again
// every period (keygate boot --reattest) over its session: POST
// /v1/reattest/challenge, then POST /v1/reattest. The quote is checked
// against the VM's policy with WindowPCR at the value the unlock's own
// extend gives it (servingPolicy): the boot chain must be unchanged, and
// WindowPCR must show exactly one unlock of this volume and nothing after
// it. A mismatch is answered api.StateLock (the VM wipes its keys and stops
// serving), audited and stored as a critical event. Sessions whose
// re-attestations stop arriving are flagged stale by CheckStale.

// StaleGrace is added to twice a session's re-attestation interval before
// CheckStale flags it.
const StaleGrace = 30 * time.Second

// Bounds of api.ReattestRequest.IntervalSeconds.
const (
	MinReattestInterval = time.Second
	MaxReattestInterval = time.Hour
)

// servedWindow is WindowPCR's value once a VM extended it once, for
// volume, right after its unlock (boot: api.UnlockDoneEvent).
func servedWindow(volume string) []byte {
	ev := sha256.Sum256(api.UnlockDoneEvent(volume))
	h := sha256.New()
	h.Write(windowReset)
	h.Write(ev[:])
	return h.Sum(nil)
}

// servingPolicy is the policy a re-attestation of a session of volume is
// checked against: the release policy with WindowPCR at servedWindow.
func servingPolicy(raw json.RawMessage, volume string) (*attest.Policy, error) {
	p, err := releasePolicy(raw)
	if err != nil {
		return nil, err
	}
	if len(p.PCRs) == 0 {
		return p, nil
	}
	q := *p
	q.PCRs = maps.Clone(p.PCRs)
	q.PCRs[WindowPCR] = [][]byte{servedWindow(volume)}
	return &q, nil
}

// reattestBinding is what a re-attestation challenge is bound to in place
// of a volume: the session's ID, so that it is good for that session
// alone (and, naming no volume, never for an unlock).
func reattestBinding(sessionID string) string { return "reattest:" + sessionID }

// handleReattestChallenge is POST /v1/reattest/challenge.
func (s *Server) handleReattestChallenge(w http.ResponseWriter, r *http.Request) {
	c, ok := s.bearerSession(w, r)
	if !ok {
		return
	}
	if s.serving.isLocked(c.ID) {
		writeJSON(w, http.StatusOK, api.ReattestResponse{State: api.StateLock, Reason: api.ReasonPolicy})
		return
	}
	vm, ek, ak, done := s.reattestKeys(w, r, c, false)
	if done {
		return
	}
	if !s.allowVM(r, vm.Name) {
		tooMany(w, "VM")
		return
	}
	nonce, token, err := s.chs.Load().cur.Issue(c.VM, reattestBinding(c.ID), ek, ak)
	if err != nil {
		s.internal(w, "issue challenge", err)
		return
	}
	writeJSON(w, http.StatusOK, api.ReattestChallengeResponse{Nonce: nonce, Challenge: token})
}

// reattestKeys reads the session's VM and its enrolled keys; done means an
// answer was written. A revoked session is answered api.StateRevoked by POST
// /v1/reattest (final), and refused (403 revoked) by the challenge.
func (s *Server) reattestKeys(w http.ResponseWriter, r *http.Request, c sessionClaims, final bool) (vm store.VM, ek, ak crypto.PublicKey, done bool) {
	state, err := s.sessionState(r, c)
	if err != nil {
		s.internal(w, "read session state", err)
		return vm, nil, nil, true
	}
	if state != api.StateActive {
		s.serving.end(c.ID)
		if final {
			writeJSON(w, http.StatusOK, api.ReattestResponse{State: api.StateRevoked})
		} else {
			s.refuse(w, r, c.VM, c.Volume, &refusal{reason: api.ReasonRevoked, hint: "the session was revoked (VM revoked or volume erased): wipe the keys"})
		}
		return vm, nil, nil, true
	}
	vm, err = s.st.GetVM(r.Context(), c.VM)
	if err != nil {
		s.readFailed(w, r, c.VM, c.Volume, err)
		return vm, nil, nil, true
	}
	ek, ak, f := enrolledKeys(vm, nil, nil)
	if f != nil {
		s.refuse(w, r, c.VM, c.Volume, f)
		return vm, nil, nil, true
	}
	return vm, ek, ak, false
}

// handleReattest is POST /v1/reattest.
func (s *Server) handleReattest(w http.ResponseWriter, r *http.Request) {
	c, ok := s.bearerSession(w, r)
	if !ok {
		return
	}
	var req api.ReattestRequest
	if e := readJSON(w, r, api.MaxUnlockBody, &req); e != nil {
		writeError(w, e)
		return
	}
	interval := time.Duration(req.IntervalSeconds) * time.Second
	if interval < MinReattestInterval || interval > MaxReattestInterval {
		writeError(w, errorf(http.StatusBadRequest, "send how often the VM re-attests, in seconds", "interval_seconds %d is outside %d to %d",
			req.IntervalSeconds, int64(MinReattestInterval/time.Second), int64(MaxReattestInterval/time.Second)))
		return
	}
	if s.serving.isLocked(c.ID) {
		writeJSON(w, http.StatusOK, api.ReattestResponse{State: api.StateLock, Reason: api.ReasonPolicy})
		return
	}
	vm, ek, ak, done := s.reattestKeys(w, r, c, true)
	if done {
		return
	}
	ctx := r.Context()
	claims, err := s.checkChallenge(req.Challenge, c.VM, reattestBinding(c.ID), ek, ak)
	if err != nil {
		if isChallengeErr(err) {
			s.refuse(w, r, c.VM, c.Volume, &refusal{reason: api.ReasonChallenge, hint: err.Error() + "; request a new one from POST /v1/reattest/challenge"})
		} else {
			s.internal(w, "check challenge", err)
		}
		return
	}
	if err := s.st.UseChallenge(ctx, hex.EncodeToString(claims.ID()), claims.Expiry); errors.Is(err, store.ErrChallengeUsed) {
		s.refuse(w, r, c.VM, c.Volume, &refusal{reason: api.ReasonChallenge, hint: attest.ErrChallengeReplayed.Error() + "; request a new challenge for every re-attestation"})
		return
	} else if err != nil {
		s.internal(w, "record challenge use", err)
		return
	}
	att := &pb.Attestation{}
	if err := proto.Unmarshal(req.Attestation, att); err != nil {
		s.refuse(w, r, c.VM, c.Volume, &refusal{reason: api.ReasonEvidence, hint: "attestation is not a go-tpm-tools Attestation proto: " + err.Error()})
		return
	}
	pol, err := servingPolicy(vm.Policy, c.Volume)
	if err != nil {
		s.internal(w, "read policy", fmt.Errorf("vm %q: stored policy: %w", vm.Name, err))
		return
	}
	d, err := verifyServing(att, attest.VerifyOpts{Nonce: claims.Nonce, TrustedAKs: []crypto.PublicKey{ak}, Policy: pol})
	switch {
	case d != nil:
		s.reattestFailed(r, c, d)
		writeJSON(w, http.StatusOK, api.ReattestResponse{State: api.StateLock, Denial: d, Reason: api.ReasonPolicy})
		return
	case err != nil:
		// Not a quote of the enrolled AK over this nonce: nothing was
		// learned about the VM's state (the sender may not even be the
		// VM); refused like an unlock's bad evidence.
		s.refuse(w, r, c.VM, c.Volume, verifyRefusal(err))
		return
	}
	s.lm.reattests.WithLabelValues("ok").Inc()
	if s.serving.seen(c.ID, c.VM, c.Volume, interval, s.now()) {
		s.log.Info("re-attestations resumed", slog.String("vm", c.VM), slog.String("volume", c.Volume), slog.String("session_id", c.ID))
		s.addEvent(ctx, store.VMEvent{VM: c.VM, Volume: c.Volume, Session: c.ID, Kind: "reattest-resumed", Severity: "info"})
	}
	writeJSON(w, http.StatusOK, api.ReattestResponse{State: api.StateActive})
}

// verifyServing verifies a serving VM's attestation: a *Denial means lock,
// an error means the evidence proves nothing (refuse).
//
// A measurement made after boot into a PCR that the firmware's event log
// covers (a runtime measurement into PCR 9, say) makes the log no longer
// replay to the quoted PCRs, which attest.Verify reports as bad evidence,
// not as a denial. So when the full check fails for any reason but the AK,
// the quote is checked again without its event log: if it is the enrolled
// AK's quote over this nonce, the VM's state is what it signed, and that
// state is judged: off the policy, the denial names the PCRs; on it, the
// log alone disagrees with the PCRs, and that too is a state the unlock
// was not made in.
func verifyServing(att *pb.Attestation, opts attest.VerifyOpts) (*attest.Denial, error) {
	_, err := attest.Verify(att, opts)
	var d *attest.Denial
	switch {
	case err == nil:
		return nil, nil
	case errors.As(err, &d):
		return d, nil
	case errors.Is(err, attest.ErrUntrustedAK) || len(att.GetEventLog()) == 0:
		return nil, err
	}
	bare := proto.Clone(att).(*pb.Attestation)
	bare.EventLog = nil
	_, berr := attest.Verify(bare, opts)
	switch {
	case errors.As(berr, &d):
		d.Reason = "the event log no longer replays to the quoted PCRs (a measurement after boot), and " + d.Reason
		return d, nil
	case berr == nil:
		return &attest.Denial{Reason: "the event log no longer replays to the quoted PCRs (a measurement after boot)", Mismatches: []attest.PCRMismatch{}}, nil
	}
	return nil, err
}

// reattestFailed audits and stores a failed re-attestation as critical.
func (s *Server) reattestFailed(r *http.Request, c sessionClaims, d *attest.Denial) {
	s.lm.reattests.WithLabelValues("lock").Inc()
	s.serving.lock(c.ID, s.now())
	det := audit.Reattest{Volume: c.Volume, SessionID: c.ID, Result: api.StateLock, Reason: d.Reason, Remote: remoteHost(r)}
	for _, m := range d.Mismatches {
		det.Mismatches = append(det.Mismatches, audit.PCRMismatch{PCR: m.PCR, Allowed: m.Allowed, Got: m.Got})
	}
	for _, rf := range d.Rules {
		det.Rules = append(det.Rules, rf.Rule)
	}
	s.log.Error("re-attestation failed the policy; the VM is told to lock", slog.String("vm", c.VM), slog.String("volume", c.Volume),
		slog.String("session_id", c.ID), slog.String("reason", d.Reason))
	s.record(r.Context(), audit.Event{Actor: "vm:" + c.VM, Action: audit.ActionReattest, Subject: c.Volume, Details: det})
	s.addEvent(r.Context(), store.VMEvent{VM: c.VM, Volume: c.Volume, Session: c.ID, Kind: "reattest-failed", Severity: "critical",
		Data: mustJSON(map[string]any{"kind": "reattest-failed", "severity": "critical", "reason": d.Reason, "mismatches": det.Mismatches})})
}

// CheckStale flags the sessions whose re-attestations stopped arriving
// (none for twice their interval plus StaleGrace): each once, as a warning
// event and an audit record, and in the keysvc_reattest_stale_sessions
// gauge until it re-attests again. It returns how many it flagged. A
// Service calls it every minute.
//
// It knows the sessions that re-attested to this replica since it started:
// with several replicas, a VM that fails over is flagged by the replica it
// left (and its event says which replica it last reached).
func (s *Server) CheckStale(ctx context.Context) int {
	stale := s.serving.flagStale(s.now())
	for _, ss := range stale {
		s.log.Warn("re-attestations stopped arriving", slog.String("vm", ss.vm), slog.String("volume", ss.volume),
			slog.String("session_id", ss.id), slog.Time("last", ss.last), slog.Duration("interval", ss.interval))
		s.record(ctx, audit.Event{Actor: "keysvc", Action: audit.ActionReattest, Subject: ss.volume,
			Details: audit.Reattest{Volume: ss.volume, SessionID: ss.id, Result: "stale", Reason: fmt.Sprintf("no re-attestation since %s (interval %s)", ss.last.Format(time.RFC3339), ss.interval)}})
		s.addEvent(ctx, store.VMEvent{VM: ss.vm, Volume: ss.volume, Session: ss.id, Kind: "reattest-stale", Severity: "critical",
			Data: mustJSON(map[string]any{"kind": "reattest-stale", "severity": "critical", "last": ss.last, "interval_seconds": int64(ss.interval / time.Second)})})
	}
	return len(stale)
}

// addEvent stores one event the service itself raises about a VM, wakes
// the live streams and queues it as an alert, as POST /v1/events does.
func (s *Server) addEvent(ctx context.Context, ev store.VMEvent) {
	ctx = context.WithoutCancel(ctx)
	ev.Received = s.now()
	if ev.Data == nil {
		ev.Data = mustJSON(map[string]string{"kind": ev.Kind, "severity": ev.Severity})
	}
	s.metrics.events.WithLabelValues(ev.Severity, "other").Inc()
	stored, err := s.st.AddEvents(ctx, []store.VMEvent{ev})
	if err != nil {
		s.log.Error("store event failed", slog.String("kind", ev.Kind), slog.Any("err", err))
		return
	}
	s.bell.ring()
	if err := s.queueAlerts(ctx, stored); err != nil {
		s.log.Error("queue alert failed", slog.String("kind", ev.Kind), slog.Any("err", err))
	}
}

func mustJSON(v any) []byte {
	b, err := json.Marshal(v)
	if err != nil {
		return []byte("{}")
	}
	return b
}

// servingSessions tracks, in memory, the sessions that re-attest, and the
// sessions a failed re-attestation locked.
type servingSessions struct {
	mu sync.Mutex
	m  map[string]*servingSession
	// locked remembers, until forgetAfter, the sessions told to lock, so
	// that a VM that ignores the answer (root in it can) is not served
	// again: its heartbeat reads revoked, and it gets no new challenge.
	locked map[string]time.Time
}

type servingSession struct {
	id, vm, volume string
	last           time.Time
	interval       time.Duration
	stale          bool
}

// maxServing bounds the sessions tracked; past it the oldest are dropped.
const maxServing = 1 << 17

// forgetAfter is how long a stale session is kept (and counted) before it
// is forgotten: a VM that stopped for good.
const forgetAfter = 24 * time.Hour

func newServingSessions() *servingSessions {
	return &servingSessions{m: map[string]*servingSession{}, locked: map[string]time.Time{}}
}

// lock stops tracking the session and remembers it as locked.
func (ss *servingSessions) lock(id string, now time.Time) {
	ss.mu.Lock()
	defer ss.mu.Unlock()
	delete(ss.m, id)
	if len(ss.locked) >= maxServing { // flagStale forgets them after forgetAfter; this only bounds a burst
		for k := range ss.locked {
			delete(ss.locked, k)
			break
		}
	}
	ss.locked[id] = now
}

// isLocked reports whether a failed re-attestation locked the session.
func (ss *servingSessions) isLocked(id string) bool {
	ss.mu.Lock()
	defer ss.mu.Unlock()
	_, ok := ss.locked[id]
	return ok
}

// seen records a good re-attestation; true if the session was stale.
func (ss *servingSessions) seen(id, vm, volume string, interval time.Duration, now time.Time) bool {
	ss.mu.Lock()
	defer ss.mu.Unlock()
	e, ok := ss.m[id]
	if !ok {
		if len(ss.m) >= maxServing {
			ss.dropOldest()
		}
		e = &servingSession{id: id, vm: vm, volume: volume}
		ss.m[id] = e
	}
	was := e.stale
	e.last, e.interval, e.stale = now, interval, false
	return was
}

func (ss *servingSessions) dropOldest() {
	var oldest *servingSession
	for _, e := range ss.m {
		if oldest == nil || e.last.Before(oldest.last) {
			oldest = e
		}
	}
	if oldest != nil {
		delete(ss.m, oldest.id)
	}
}

// end forgets a session that was told to lock or was revoked.
func (ss *servingSessions) end(id string) {
	ss.mu.Lock()
	delete(ss.m, id)
	ss.mu.Unlock()
}

// flagStale marks and returns the sessions newly stale at now, and forgets
// those stale, or locked, for longer than forgetAfter.
func (ss *servingSessions) flagStale(now time.Time) []servingSession {
	ss.mu.Lock()
	defer ss.mu.Unlock()
	var out []servingSession
	for id, e := range ss.m {
		due := e.last.Add(2*e.interval + StaleGrace)
		switch {
		case e.stale && now.After(due.Add(forgetAfter)):
			delete(ss.m, id)
		case !e.stale && now.After(due):
			e.stale = true
			out = append(out, *e)
		}
	}
	for id, t := range ss.locked {
		if now.Sub(t) > forgetAfter {
			delete(ss.locked, id)
		}
	}
	return out
}

// staleCount is how many tracked sessions are stale.
func (ss *servingSessions) staleCount() int {
	ss.mu.Lock()
	defer ss.mu.Unlock()
	n := 0
	for _, e := range ss.m {
		if e.stale {
			n++
		}
	}
	return n
}
