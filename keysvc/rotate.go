package keysvc

import (
	"bytes"
	"context"
	"crypto"
	"crypto/hmac"
	"crypto/rand"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"strconv"
	"strings"
	"time"

	tpmpb "github.com/google/go-tpm-tools/proto/tpm"
	"google.golang.org/protobuf/proto"

	"github.com/keygate/keygate/keysvc/api"
	"github.com/keygate/keygate/keysvc/audit"
	"github.com/keygate/keygate/keysvc/masterkey"
	"github.com/keygate/keygate/keysvc/store"
	"github.com/keygate/keygate/tpm/importblob"
)

// Unwrap-key rotation (issue 15). `keysvc volume rotate` makes a second UK
// for a volume and keeps it beside the current one (store.Rotations). Every
// unlock then releases both, each sealed to the VM's TPM as usual. keygate
// opens the image with the current UK, adds a keyslot under the pending
// one, removes the old keyslot, and then proves to the service that it
// holds the pending UK (POST /v1/rotate, api.RotateProof). Only then does the
// service make the pending UK the volume's and destroy the old one, in one
// transaction with its audit record. So at every moment the image opens
// with a UK the service still holds: before the proof the service holds
// both; after it, the image opens with the new one alone (keygate proves
// only once its old keyslot is gone).
//
// The pending UK is sealed under its own record ID (ukNextRecordID): the
// same binding to volume, owner and EK as the current one, in another
// domain, so that neither sealed key can stand in for the other.

// ukNextRecordID is the record ID a pending UK is sealed under.
func ukNextRecordID(volume, vm, ekFingerprint string) string {
	return "uk-next v1\x00" + volume + "\x00" + vm + "\x00" + ekFingerprint
}

// Fault-injection steps of the rotation (WithFaults).
const (
	FaultRotateStart    = "rotate-start"     // admin rotate: pending UK made, not yet stored
	FaultConfirmProven  = "confirm-proven"   // POST /v1/rotate: proof checked, old UK not yet destroyed
	FaultConfirmDone    = "confirm-finished" // POST /v1/rotate: old UK destroyed, answer not yet sent
	FaultReleasePending = "release-pending"  // unlock: current UK sealed, pending UK not yet sealed
)

// WithFaults sets a fault injector, for crash tests only: fault is called
// at each named step of a rotation (the Fault* constants) and an error
// stops the request there, with a 500, as a crash at that point would
// (what was committed before it stays; nothing after it happens).
func WithFaults(fault func(step string) error) Option { return func(s *Server) { s.faults = fault } }

// fault runs the fault injector at step; true means stop (500 answered).
func (s *Server) fault(w http.ResponseWriter, step string) bool {
	if s.faults == nil {
		return false
	}
	if err := s.faults(step); err != nil {
		s.log.Error("injected fault", slog.String("step", step), slog.Any("err", err))
		writeError(w, errorf(http.StatusInternalServerError, "", "injected fault at %s", step))
		return true
	}
	return false
}

// auditVia is the part of *audit.Log that appends through a store's own
// transaction.
type auditVia interface {
	AppendVia(ctx context.Context, ev audit.Event, via func(next store.AuditNext) error) (audit.Record, error)
}

// rotations returns the store's Rotations and the audit log's AppendVia, or
// false if either lacks them.
func (s *Server) rotations() (store.Rotations, auditVia, bool) {
	var raw any = s.st
	if a, ok := s.st.(*authStore); ok {
		raw = a.Store
	}
	rs, ok1 := raw.(store.Rotations)
	via, ok2 := s.audit.(auditVia)
	return rs, via, ok1 && ok2
}

var errNoRotations = errorf(http.StatusNotImplemented, "run keysvc on a store that supports rotation (SQLite does)", "this key service's store does not support unwrap-key rotation")

// adminRotate is POST /v1/admin/volumes/{id}/rotate: make a pending UK.
func (s *Server) adminRotate(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	rs, via, ok := s.rotations()
	if !ok {
		writeError(w, errNoRotations)
		return
	}
	ctx := r.Context()
	vol, err := s.st.GetVolume(ctx, id)
	if err != nil {
		s.storeError(w, "rotate volume "+strconv.Quote(id), err)
		return
	}
	if vol.Erased() {
		writeError(w, errorf(http.StatusConflict, "an erased volume has no key to rotate", "volume %q is erased", id))
		return
	}
	if p, err := rs.GetRotation(ctx, id); err == nil {
		writeError(w, errorf(http.StatusConflict, "the VM completes it at its next unlock (keygate boot), or cancel it with `keysvc volume rotate --cancel`; `keysvc volume list --json` says when it started",
			"volume %q has a rotation pending since %s", id, p.Started.Format(time.RFC3339)))
		return
	}
	owner, err := s.st.GetVM(ctx, vol.VM)
	if err != nil {
		s.storeError(w, "rotate volume "+strconv.Quote(id)+": vm "+strconv.Quote(vol.VM), err)
		return
	}
	ekFP := fingerprint(owner.EKPubPEM)
	if ekFP == "" {
		writeError(w, errorf(http.StatusConflict, "enroll the VM again", "vm %q: its enrolled EK does not parse", vol.VM))
		return
	}
	uk := make([]byte, api.UKSize)
	if _, err := rand.Read(uk); err != nil {
		s.internal(w, "make unwrap key", err)
		return
	}
	sealed, err := s.rows.seal(ukNextRecordID(id, vol.VM, ekFP), uk)
	clear(uk)
	if err != nil {
		s.internal(w, "seal unwrap key", err)
		return
	}
	if s.fault(w, FaultRotateStart) {
		return
	}
	// The record, the volume's next generation and the pending key are
	// stored together, or none of them.
	var started store.Rotation
	_, err = via.AppendVia(ctx, audit.Event{Actor: "admin", Action: audit.ActionRotate, Subject: id,
		Details: audit.Rotate{Volume: id, Step: "started", Generation: vol.Rotation + 1, Remote: remoteHost(r)}}, func(next store.AuditNext) error {
		var err error
		started, err = rs.StartRotation(context.WithoutCancel(ctx), id, func(v *store.Volume, p *store.Rotation) error {
			if err := s.rows.checkVolume(*v); err != nil {
				return err
			}
			if v.RotationPending { // its row is gone: a missing row is never replaced silently
				return s.rows.checkRotation(*v, nil)
			}
			if v.Rotation != vol.Rotation { // another rotation began and ended meanwhile
				return errRotationRaced
			}
			v.Rotation++
			v.RotationPending = true
			p.Generation, p.SealedUK = v.Rotation, sealed
			p.MAC = s.rows.rotationMAC(*p)
			v.MAC = s.rows.volumeMAC(*v)
			return nil
		}, next)
		return err
	})
	if errors.Is(err, ErrTampered) {
		s.tampered(r, vol.VM, id, err)
		writeError(w, errorf(http.StatusConflict, "run `keysvc audit verify`", "rotate volume %q: %v", id, err))
		return
	}
	if errors.Is(err, errRotationRaced) {
		writeError(w, errorf(http.StatusConflict, "run `keysvc volume rotate` again", "volume %q: another rotation began meanwhile", id))
		return
	}
	if err != nil {
		s.storeError(w, "rotate volume "+strconv.Quote(id), err)
		return
	}
	s.lm.rotations.WithLabelValues("started").Inc()
	s.log.Info("rotation started", slog.String("volume", id), slog.String("vm", vol.VM))
	info := volumeInfo(vol)
	info.Rotation, info.RotationStarted = api.RotationPending, &started.Started
	writeJSON(w, http.StatusAccepted, info)
}

// withRotations fills in Rotation on volume listings (as stored: rows
// that fail their check are named by `keysvc audit verify`).
func (s *Server) withRotations(ctx context.Context, infos []api.VolumeInfo) {
	rs, _, ok := s.rotations()
	if !ok {
		return
	}
	rows, err := rs.ListRotations(ctx)
	if err != nil {
		s.log.Warn("list pending rotations", slog.Any("err", err))
		return
	}
	pend := make(map[string]store.Rotation, len(rows))
	for _, r := range rows {
		pend[r.Volume] = r
	}
	for i := range infos {
		if r, ok := pend[infos[i].ID]; ok {
			infos[i].Rotation, infos[i].RotationStarted = api.RotationPending, &r.Started
			if r.Cancelling {
				infos[i].Rotation = api.RotationCancelling
			}
		}
	}
}

// pendingBlob seals a volume's pending UK, if it has one, to the VM's EK
// and pcrs, as release does the current one: nil if there is none (or the
// store cannot hold one). cancelling says an operator cancelled the
// rotation after its key was released (the VM then keeps the key its
// image holds, rotate.go). A row that fails its check (rotationauth.go)
// is an error wrapping ErrTampered; a pending UK is marked released,
// durably, before its blob is made.
func (s *Server) pendingBlob(ctx context.Context, vol store.Volume, ekFP string, ek crypto.PublicKey, pcrs *tpmpb.PCRs) (blob []byte, cancelling bool, err error) {
	rs, _, ok := s.rotations()
	if !ok {
		return nil, false, nil
	}
	if !vol.RotationPending && !vol.RotationRow {
		// The unlock's read of the volume found no rotation pending and no
		// row (a row there would be one put back, which pendingRotation
		// raises): nothing to read, which spares most unlocks a query. A
		// volume provisioned by this unlock has no row either.
		return nil, false, nil
	}
	p, err := s.pendingRotation(ctx, rs, vol)
	if err != nil || p == nil {
		return nil, false, err
	}
	if !p.Released {
		u, err := rs.UpdateRotation(ctx, vol.ID, func(v store.Volume, r *store.Rotation) error {
			if err := s.rows.checkVolume(v); err != nil {
				return err
			}
			if err := s.rows.checkRotation(v, r); err != nil {
				return err
			}
			if r.Generation != p.Generation {
				return errRotationRaced
			}
			r.Released = true
			r.MAC = s.rows.rotationMAC(*r)
			return nil
		}, nil)
		if errors.Is(err, store.ErrNotFound) || errors.Is(err, errRotationRaced) {
			return nil, false, nil // cancelled or finished meanwhile: the current key alone
		}
		if err != nil {
			return nil, false, fmt.Errorf("mark pending unwrap key released: %w", err)
		}
		p = &u
	}
	uk, wipe, err := s.openUK(ukNextRecordID(vol.ID, vol.VM, ekFP), p.SealedUK)
	if err != nil {
		return nil, false, fmt.Errorf("open pending unwrap key: %w", err)
	}
	b, err := importblob.New(ek, uk, pcrs)
	wipe()
	if err != nil {
		return nil, false, fmt.Errorf("create import blob of the pending key: %w", err)
	}
	blob, err = proto.Marshal(b)
	return blob, p.Cancelling, err
}

// handleRotateConfirm is POST /v1/rotate: the VM proves it holds the
// pending UK, and the service destroys the old one.
func (s *Server) handleRotateConfirm(w http.ResponseWriter, r *http.Request) {
	c, ok := s.bearerSession(w, r)
	if !ok {
		return
	}
	var req api.RotateConfirmRequest
	if e := readJSON(w, r, api.MaxChallengeBody, &req); e != nil {
		writeError(w, e)
		return
	}
	ctx := r.Context()
	rs, _, ok := s.rotations()
	if !ok {
		writeError(w, errNoRotations)
		return
	}
	state, err := s.sessionState(r, c)
	if err != nil {
		s.internal(w, "read session state", err)
		return
	}
	if state != api.StateActive {
		s.refuse(w, r, c.VM, c.Volume, &refusal{reason: api.ReasonRevoked, hint: "the session was revoked (VM revoked or volume erased)"})
		return
	}
	vm, vol, err := s.vmAndVolume(ctx, c.VM, c.Volume)
	if err != nil || vol == nil {
		if err == nil {
			err = fmt.Errorf("volume %q: %w", c.Volume, store.ErrNotFound)
		}
		s.readFailed(w, r, c.VM, c.Volume, err)
		return
	}
	ekFP := fingerprint(vm.EKPubPEM)
	// Which key does the proof hold? The pending one completes the
	// rotation (even one an operator cancelled after its key was released:
	// the image may hold that key alone); the current one means the
	// rotation completed already (a repeated confirmation whose first
	// answer was lost) or, while a cancel waits, that the VM keeps the
	// current key, which ends the cancel.
	pending, perr := s.pendingRotation(ctx, rs, *vol)
	if errors.Is(perr, ErrTampered) {
		s.readFailed(w, r, c.VM, c.Volume, perr)
		return
	}
	if perr != nil {
		s.internal(w, "read pending rotation", perr)
		return
	}
	holdsCurrent := s.proves(vol.SealedUK, ukRecordID(vol.ID, vol.VM, ekFP), c, r, req.Proof)
	if pending == nil {
		if holdsCurrent {
			writeJSON(w, http.StatusOK, api.RotateConfirmResponse{Rotation: api.RotationDone})
			return
		}
		writeError(w, errorf(http.StatusConflict, "nothing to confirm: rotate the volume first with `keysvc volume rotate`", "volume %q has no rotation pending", c.Volume))
		return
	}
	if pending.Cancelling && holdsCurrent {
		s.endRotation(w, r, c, *pending, nil)
		return
	}
	if !s.proves(pending.SealedUK, ukNextRecordID(vol.ID, vol.VM, ekFP), c, r, req.Proof) {
		s.refuse(w, r, c.VM, c.Volume, &refusal{reason: api.ReasonRotateProof, hint: "the proof is not under the volume's pending unwrap key and this session; unlock again and confirm with the pending key"})
		return
	}
	// Re-seal the pending UK as the volume's, outside the transaction.
	uk, wipe, err := s.openUK(ukNextRecordID(vol.ID, vol.VM, ekFP), pending.SealedUK)
	if err != nil {
		s.internal(w, "open pending unwrap key", err)
		return
	}
	resealed, err := s.rows.seal(ukRecordID(vol.ID, vol.VM, ekFP), uk)
	wipe()
	if err != nil {
		s.internal(w, "seal unwrap key", err)
		return
	}
	if s.fault(w, FaultConfirmProven) {
		return
	}
	s.endRotation(w, r, c, *pending, resealed)
}

// endRotation ends the pending rotation the VM of session c confirmed:
// with resealed (the pending UK sealed as the volume's) it completes, and
// the old UK is destroyed; with nil it ends a cancel, and the pending UK is
// destroyed. Either way in one transaction with its audit record, and only
// if the rotation is still pending as read.
func (s *Server) endRotation(w http.ResponseWriter, r *http.Request, c sessionClaims, pending store.Rotation, resealed []byte) {
	rs, via, _ := s.rotations()
	step, answer := "completed", api.RotationDone
	if resealed == nil {
		step, answer = "cancelled", api.RotationCancelled
	} else if pending.Cancelling {
		step = "completed-despite-cancel"
	}
	_, err := via.AppendVia(r.Context(), audit.Event{Actor: "vm:" + c.VM, Action: audit.ActionRotate, Subject: c.Volume,
		Details: audit.Rotate{Volume: c.Volume, Step: step, SessionID: c.ID, Generation: pending.Generation, Remote: remoteHost(r)}}, func(next store.AuditNext) error {
		_, err := rs.FinishRotation(context.WithoutCancel(r.Context()), c.Volume, func(v *store.Volume, p store.Rotation) error {
			return s.endRotationRow(v, p, pending, resealed)
		}, next)
		return err
	})
	switch {
	case errors.Is(err, store.ErrNotFound), errors.Is(err, errRotationRaced):
		writeError(w, errorf(http.StatusConflict, "unlock again and confirm with the keys then released", "volume %q: the rotation changed while it was confirmed", c.Volume))
		return
	case errors.Is(err, ErrTampered):
		s.readFailed(w, r, c.VM, c.Volume, err)
		return
	case err != nil:
		s.internal(w, "finish rotation", err)
		return
	}
	if s.fault(w, FaultConfirmDone) {
		return
	}
	s.lm.rotations.WithLabelValues(step).Inc()
	if resealed == nil {
		s.log.Info("rotation cancelled; the VM keeps the current key and the pending unwrap key is destroyed", slog.String("volume", c.Volume), slog.String("vm", c.VM), slog.String("session_id", c.ID))
	} else {
		s.log.Info("rotation completed; old unwrap key destroyed", slog.String("volume", c.Volume), slog.String("vm", c.VM), slog.String("session_id", c.ID), slog.String("step", step))
	}
	writeJSON(w, http.StatusOK, api.RotateConfirmResponse{Rotation: answer})
}

// endRotationRow is FinishRotation's step: it checks the stored volume and
// rotation (p must still be pending as read) and ends the rotation, with
// resealed as the volume's key, or (nil) keeping the volume's key.
func (s *Server) endRotationRow(v *store.Volume, p, pending store.Rotation, resealed []byte) error {
	if err := s.rows.checkVolume(*v); err != nil {
		return err
	}
	if err := s.rows.checkRotation(*v, &p); err != nil {
		return err
	}
	if p.Generation != pending.Generation || !bytes.Equal(p.SealedUK, pending.SealedUK) {
		return errRotationRaced
	}
	if resealed != nil {
		v.SealedUK = resealed
	}
	v.RotationPending = false
	v.MAC = s.rows.volumeMAC(*v)
	return nil
}

var errRotationRaced = errors.New("the pending key changed")

// rekeyPendingUKs re-seals every pending unwrap key under ks.cur and
// re-MACs its row, for a master-key rotation (masterkey_rotate.go), after
// the volumes: a key sealed under the old master key would not open once
// that key is wiped. ekFP gives a VM's EK fingerprint. Each row is checked
// first (rotationauth.go): one that fails stops the master-key rotation
// rather than being re-MAC'd under the new key. The keys are re-sealed
// first and stored in one transaction, each only if its sealed key did not
// change meanwhile (a rotation finished or started since was written under
// ks.cur already).
func (s *Server) rekeyPendingUKs(ctx context.Context, ks *ringKeys, ekFP func(vm string) (string, error)) error {
	rs, _, ok := s.rotations()
	if !ok {
		return nil
	}
	pend, err := rs.PendingRotations(ctx)
	if err != nil {
		return err
	}
	type resealed struct{ old, new []byte }
	next := map[string]resealed{}
	for id := range pend {
		vol, err := s.st.GetVolume(ctx, id)
		if err != nil {
			return fmt.Errorf("rekey pending key of volume %q: %w", id, err)
		}
		p, err := s.pendingRotation(ctx, rs, vol)
		if err != nil {
			return fmt.Errorf("rekey pending key of volume %q: %w", id, err)
		}
		if p == nil {
			continue
		}
		fp, err := ekFP(vol.VM)
		if err != nil {
			return fmt.Errorf("rekey pending key of volume %q: %w", id, err)
		}
		rid := ukNextRecordID(vol.ID, vol.VM, fp)
		uk, done, err := s.openUK(rid, p.SealedUK)
		if err != nil {
			return fmt.Errorf("rekey pending key of volume %q: %w", id, err)
		}
		sealed, err := ks.cur.Seal(rid, uk)
		done()
		if err != nil {
			return fmt.Errorf("rekey pending key of volume %q: %w", id, err)
		}
		next[id] = resealed{p.SealedUK, sealed}
	}
	n, err := rs.RekeyRotations(ctx, func(p *store.Rotation) error {
		r, ok := next[p.Volume]
		if !ok || !bytes.Equal(p.SealedUK, r.old) {
			return nil
		}
		if err := s.rows.check(func(rk rowKey) error { return rk.checkRotationMAC(*p) }); err != nil {
			return fmt.Errorf("rekey: %w", err)
		}
		p.SealedUK = r.new
		p.MAC = ks.rows.rotationMAC(*p)
		return nil
	})
	if n > 0 {
		s.log.Info("master-key rotation: pending unwrap keys re-sealed", slog.Int("count", len(next)))
	}
	return err
}

// proves checks, in constant time, that proof is api.RotateProof under the UK
// sealed as sealed (record id) for session c.
func (s *Server) proves(sealed []byte, id string, c sessionClaims, r *http.Request, proof []byte) bool {
	if len(sealed) == 0 {
		return false
	}
	uk, wipe, err := s.openUK(id, sealed)
	if err != nil {
		if errors.Is(err, masterkey.ErrOpen) {
			s.log.Error("sealed unwrap key does not open for its volume", slog.String("volume", c.Volume), slog.Any("err", err))
		}
		return false
	}
	want := api.RotateProof(uk, sessionToken(r))
	wipe()
	return hmac.Equal(want, proof)
}

// sessionToken is the bearer token of r (checked by bearerSession).
func sessionToken(r *http.Request) string {
	tok, _ := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
	return strings.TrimSpace(tok)
}

// bearerSession reads and checks r's session token, answering 401 if it is
// missing or invalid.
func (s *Server) bearerSession(w http.ResponseWriter, r *http.Request) (sessionClaims, bool) {
	tok, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
	if !ok {
		badSession(w)
		return sessionClaims{}, false
	}
	c, err := s.parseSession(strings.TrimSpace(tok))
	if err != nil {
		badSession(w)
		return sessionClaims{}, false
	}
	return c, true
}
