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
	"strings"
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
	if locked, err := s.isLocked(r.Context(), c); err != nil {
		s.internal(w, "read session state", err)
		return
	} else if locked {
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
		s.end(r.Context(), c.ID)
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
	if locked, err := s.isLocked(r.Context(), c); err != nil {
		s.internal(w, "read session state", err)
		return
	} else if locked {
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
	d, err := verifyServing(att, attest.VerifyOpts{Nonce: api.QuoteData(claims.Nonce, s.caSum), TrustedAKs: []crypto.PublicKey{ak}, Policy: pol})
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
	wasStale, locked, err := s.seen(ctx, c, interval)
	if err != nil {
		s.internal(w, "record re-attestation", err)
		return
	}
	if locked { // at another replica, while this quote was checked
		writeJSON(w, http.StatusOK, api.ReattestResponse{State: api.StateLock, Reason: api.ReasonPolicy})
		return
	}
	s.lm.reattests.WithLabelValues("ok").Inc()
	if wasStale {
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
	s.lock(r.Context(), c)
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
// (none for twice their interval plus StaleGrace): each once fleet-wide, as
// a critical event and an audit record, and in the
// keysvc_reattest_stale_sessions gauge until it re-attests again. It also
// forgets sessions locked or stale for longer than forgetAfter. It returns
// how many it flagged. A Service calls it every minute; with several
// replicas, whichever claims a session in the store first flags it.
func (s *Server) CheckStale(ctx context.Context) int {
	if s.sessions == nil {
		return 0
	}
	now := s.now()
	s.locks.forget(now.Add(-forgetAfter))
	if _, err := s.sessions.ForgetSessions(ctx, now.Add(-forgetAfter)); err != nil {
		s.log.Warn("forget old sessions", slog.Any("err", err))
	}
	if _, err := s.checkLocks(ctx); err != nil {
		s.log.Warn("check session locks", slog.Any("err", err))
	}
	stale, err := s.sessions.ClaimStaleSessions(ctx, now, staleBatch)
	if err != nil {
		s.log.Warn("claim stale sessions", slog.Any("err", err))
		return 0
	}
	for _, ss := range stale {
		s.log.Warn("re-attestations stopped arriving", slog.String("vm", ss.VM), slog.String("volume", ss.Volume),
			slog.String("session_id", ss.ID), slog.Time("last", ss.Last), slog.Duration("interval", ss.Interval))
		s.record(ctx, audit.Event{Actor: "keysvc", Action: audit.ActionReattest, Subject: ss.Volume,
			Details: audit.Reattest{Volume: ss.Volume, SessionID: ss.ID, Result: "stale", Reason: fmt.Sprintf("no re-attestation since %s (interval %s)", ss.Last.Format(time.RFC3339), ss.Interval)}})
		s.addEvent(ctx, store.VMEvent{VM: ss.VM, Volume: ss.Volume, Session: ss.ID, Kind: "reattest-stale", Severity: "critical",
			Data: mustJSON(map[string]any{"kind": "reattest-stale", "severity": "critical", "last": ss.Last, "interval_seconds": int64(ss.Interval / time.Second)})})
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

// Re-attestation state lives in the store (store.ReattestSessions), shared
// by every replica: a lock decided at one holds at all of them and across
// restarts, and a stale session is claimed, and so flagged, by one sweep
// fleet-wide. Each row carries sessionRowMAC over its ID, VM, volume and
// lock time: a row edited from locked to unlocked fails it and reads as
// locked (fail closed). A deleted row, or one replayed from before the
// lock, reads as unlocked to a replica that has not seen the lock; this
// replica's lockCache keeps those it has seen until forgetAfter.
// docs/threat-model.md says what that leaves.

// maxServing bounds the locks a replica caches; past it the oldest go (the
// store still has them).
const maxServing = 1 << 17

// forgetAfter is how long a locked or stale session is kept before it is
// forgotten: a VM that stopped for good.
const forgetAfter = 24 * time.Hour

// staleBatch is how many stale sessions one sweep claims at most.
const staleBatch = 1000

// lockCache remembers the locks this replica has seen.
type lockCache struct {
	mu sync.Mutex
	m  map[string]time.Time
}

func newLockCache() *lockCache { return &lockCache{m: map[string]time.Time{}} }

func (lc *lockCache) add(id string, at time.Time) {
	lc.mu.Lock()
	defer lc.mu.Unlock()
	if len(lc.m) >= maxServing {
		var oldest string
		for k, t := range lc.m {
			if oldest == "" || t.Before(lc.m[oldest]) {
				oldest = k
			}
		}
		delete(lc.m, oldest)
	}
	lc.m[id] = at
}

func (lc *lockCache) has(id string) bool {
	lc.mu.Lock()
	defer lc.mu.Unlock()
	_, ok := lc.m[id]
	return ok
}

// forget drops the locks from before cutoff.
func (lc *lockCache) forget(cutoff time.Time) {
	lc.mu.Lock()
	defer lc.mu.Unlock()
	for id, t := range lc.m {
		if t.Before(cutoff) {
			delete(lc.m, id)
		}
	}
}

// isLocked reports whether a failed re-attestation locked the session, at
// any replica. A row whose MAC fails reads as locked.
func (s *Server) isLocked(ctx context.Context, c sessionClaims) (bool, error) {
	if s.locks.has(c.ID) {
		return true, nil
	}
	if s.sessions == nil {
		return false, nil
	}
	rs, err := s.sessions.GetReattestSession(ctx, c.ID)
	if errors.Is(err, store.ErrNotFound) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	if !s.sessionRowOK(rs) || rs.VM != c.VM || rs.Volume != c.Volume {
		s.sessionTampered(c, rs)
		return true, nil
	}
	if rs.IsLocked() {
		s.locks.add(c.ID, rs.Locked)
	}
	return rs.IsLocked(), nil
}

// sessionTampered logs a session row that fails its MAC, once per check.
func (s *Server) sessionTampered(c sessionClaims, rs store.ReattestSession) {
	s.log.Error("stored re-attestation session fails its integrity check; the session is treated as locked (it was changed outside the key service: run `keysvc audit verify`)",
		slog.String("vm", c.VM), slog.String("volume", c.Volume), slog.String("session_id", c.ID), slog.Bool("stored_locked", rs.IsLocked()))
}

// lock records the session as locked, in the store and in this replica's
// cache (which holds it even if the write fails: the VM is told to lock in
// any case).
func (s *Server) lock(ctx context.Context, c sessionClaims) {
	now := time.Unix(0, s.now().UnixNano()).UTC()
	s.locks.add(c.ID, now)
	if s.sessions == nil {
		return
	}
	rs := store.ReattestSession{ID: c.ID, VM: c.VM, Volume: c.Volume, Locked: now}
	rs.MAC = s.sessionRowMAC(rs)
	if err := s.sessions.LockSession(context.WithoutCancel(ctx), rs); err != nil {
		s.log.Error("store session lock failed; only this replica knows it", slog.String("session_id", c.ID), slog.Any("err", err))
	}
}

// seen records a good re-attestation. wasStale: the session had been
// flagged stale; locked: it was locked meanwhile (at another replica), or
// its row fails its MAC.
func (s *Server) seen(ctx context.Context, c sessionClaims, interval time.Duration) (wasStale, locked bool, err error) {
	if s.sessions == nil {
		return false, false, nil
	}
	now := time.Unix(0, s.now().UnixNano()).UTC()
	rs := store.ReattestSession{ID: c.ID, VM: c.VM, Volume: c.Volume, Interval: interval, Last: now, Due: now.Add(2*interval + StaleGrace)}
	rs.MAC = s.sessionRowMAC(rs)
	prev, err := s.sessions.ReattestSeen(ctx, rs)
	switch {
	case errors.Is(err, store.ErrNotFound):
		return false, false, nil
	case err != nil:
		return false, false, err
	case !s.sessionRowOK(prev) || prev.VM != c.VM || prev.Volume != c.Volume:
		s.sessionTampered(c, prev)
		return false, true, nil
	case prev.IsLocked():
		s.locks.add(c.ID, prev.Locked)
		return false, true, nil
	}
	return !prev.Stale.IsZero(), false, nil
}

// end forgets a session that was revoked: it is no longer waited for.
func (s *Server) end(ctx context.Context, id string) {
	if s.sessions == nil {
		return
	}
	if err := s.sessions.EndSession(context.WithoutCancel(ctx), id); err != nil {
		s.log.Warn("forget revoked session", slog.String("session_id", id), slog.Any("err", err))
	}
}

// countStale is the keysvc_reattest_stale_sessions gauge, read from the
// store at scrape time (-1 if the store does not answer).
func (s *Server) countStale() float64 {
	if s.sessions == nil {
		return 0
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	n, err := s.sessions.CountStaleSessions(ctx)
	if err != nil {
		return -1
	}
	return float64(n)
}

// lockScan is how far this replica has read the audit chain for lock
// records (checkLocks).
type lockScan struct {
	mu   sync.Mutex
	next uint64
}

// lockMargin keeps checkLocks off locks about to be forgotten, so that
// clocks a little apart between replicas raise no false alarm.
const lockMargin = 10 * time.Minute

// checkLocks compares the lock records of the audit chain (appended after
// each lock's row is stored) with the stored locks: a lock from the last
// forgetAfter whose row is missing, or unlocked, was deleted or replayed
// outside the key service (or its write failed). It is restored, cached,
// logged, and raised as a critical store-tampered event. It reads the
// chain from where it stopped last (the whole chain on a replica's first
// run) and returns how many locks it restored. The chain itself is not
// verified here: removing the record too is what `keysvc audit verify`
// finds.
func (s *Server) checkLocks(ctx context.Context) (int, error) {
	if s.sessions == nil {
		return 0, nil
	}
	s.lockScan.mu.Lock()
	defer s.lockScan.mu.Unlock()
	since := s.now().Add(-forgetAfter + lockMargin)
	restored := 0
	err := s.audit.Scan(ctx, max(s.lockScan.next, 1), func(rec audit.Record) error {
		s.lockScan.next = rec.Seq + 1
		if rec.Action != audit.ActionReattest || rec.Time.Before(since) {
			return nil
		}
		var d audit.Reattest
		vm, ok := strings.CutPrefix(rec.Actor, "vm:")
		if !ok || json.Unmarshal(rec.Details, &d) != nil || d.Result != api.StateLock || d.SessionID == "" {
			return nil
		}
		c := sessionClaims{VM: vm, Volume: d.Volume, ID: d.SessionID}
		rs, err := s.sessions.GetReattestSession(ctx, c.ID)
		if err == nil && rs.IsLocked() {
			return nil // a bad MAC reads as locked already (isLocked)
		}
		if err != nil && !errors.Is(err, store.ErrNotFound) {
			return err
		}
		restored++
		s.log.Error("a session lock in the audit chain is missing from the store: restored (its row was deleted or replayed outside the key service, or its write failed; run `keysvc audit verify`)",
			slog.String("vm", c.VM), slog.String("volume", c.Volume), slog.String("session_id", c.ID), slog.Uint64("audit_seq", rec.Seq))
		at := time.Unix(0, rec.Time.UnixNano()).UTC()
		s.locks.add(c.ID, at)
		lk := store.ReattestSession{ID: c.ID, VM: c.VM, Volume: c.Volume, Locked: at}
		lk.MAC = s.sessionRowMAC(lk)
		// Not cancelled with ctx (a replica stopping in the middle): a lock
		// written back without its event would leave the tampering unraised
		// for good, since the next sweep finds the row locked.
		if err := s.sessions.LockSession(context.WithoutCancel(ctx), lk); err != nil {
			return err
		}
		s.addEvent(ctx, store.VMEvent{VM: c.VM, Volume: c.Volume, Session: c.ID, Kind: "store-tampered", Severity: "critical",
			Data: mustJSON(map[string]any{"kind": "store-tampered", "severity": "critical", "record": "reattest-session", "name": c.ID,
				"detail": "session lock missing from the store; restored from the audit chain"})})
		return nil
	})
	if err != nil {
		return restored, fmt.Errorf("check session locks against the audit chain: %w", err)
	}
	return restored, nil
}
