package keysvc

import (
	"bytes"
	"context"
	"crypto"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"slices"

	tpmpb "github.com/google/go-tpm-tools/proto/tpm"
	"google.golang.org/protobuf/proto"

	"github.com/keygate/keygate/attest"
	"github.com/keygate/keygate/keysvc/api"
	"github.com/keygate/keygate/keysvc/audit"
	"github.com/keygate/keygate/keysvc/masterkey"
	"github.com/keygate/keygate/keysvc/store"
	"github.com/keygate/keygate/tpm/importblob"
)

// release seals the volume's UK to the VM's EK and the policy's PCRs, as the
// verified quote showed them, and answers 200. use, if not nil, is the
// unlock's challenge, recorded as used together with the release record; if
// it turns out used already, release answers replay instead.
func (s *Server) release(w http.ResponseWriter, r *http.Request, vm store.VM, vol store.Volume, ek crypto.PublicKey, pol *attest.Policy, res *attest.Result, use *store.ChallengeUse, replay *refusal) {
	pcrs := &tpmpb.PCRs{Hash: tpmpb.HashAlgo_SHA256, Pcrs: make(map[uint32][]byte)}
	idx := make([]int, 0, len(pol.PCRs))
	for i := range pol.PCRs {
		v, ok := res.PCRs[i]
		if !ok { // Verify checked every policy PCR is quoted
			s.internal(w, "bind blob", fmt.Errorf("PCR %d missing from a verified quote", i))
			return
		}
		pcrs.Pcrs[uint32(i)] = v
		idx = append(idx, i)
	}
	slices.Sort(idx)
	fp, err := attest.KeyFingerprint(ek)
	if err != nil {
		s.internal(w, "fingerprint enrolled EK", err)
		return
	}
	uk, wipe, err := s.openUK(ukRecordID(vol.ID, vm.Name, hex.EncodeToString(fp[:])), vol.SealedUK)
	if errors.Is(err, masterkey.ErrOpen) {
		// The row MACs passed, but the sealed UK is not this volume's,
		// this owner's or this EK's: it was moved or its row re-pointed.
		s.readFailed(w, r, vm.Name, vol.ID, fmt.Errorf("%w: %w", &TamperError{Kind: "volume", Name: vol.ID,
			Detail: "the sealed UK does not open for this volume, owner VM and EK"}, err))
		return
	}
	if err != nil {
		s.internal(w, "open sealed unwrap key", err)
		return
	}
	blob, err := importblob.New(ek, uk, pcrs)
	wipe()
	if err != nil {
		s.internal(w, "create import blob", err)
		return
	}
	blobBytes, err := proto.Marshal(blob)
	if err != nil {
		s.internal(w, "encode import blob", err)
		return
	}
	ctx := context.WithoutCancel(r.Context())
	// A rotation's pending UK travels with the current one (rotate.go).
	if s.fault(w, FaultReleasePending) {
		return
	}
	nextBlob, cancelling, err := s.pendingBlob(ctx, vol, hex.EncodeToString(fp[:]), ek, pcrs)
	if errors.Is(err, masterkey.ErrOpen) {
		err = fmt.Errorf("%w: %w", &TamperError{Kind: "rotation", Name: vol.ID, Detail: "the pending unwrap key does not open for this volume, owner VM and EK"}, err)
	}
	if errors.Is(err, ErrTampered) {
		// The pending rotation's row was changed outside the service (a
		// row put back from an earlier rotation, a forged or deleted one):
		// release the current key alone, which opens the image unless the
		// VM already moved it to the genuine pending key, and raise it.
		s.tampered(r, vm.Name, vol.ID, err)
		nextBlob, cancelling, err = nil, false, nil
	}
	if err != nil {
		s.internal(w, "seal pending unwrap key", err)
		return
	}
	sess, id := s.newSession(vm.Name, vol.ID)
	// Fail closed: a key is released only once its release is on record.
	ev := audit.Event{Actor: "vm:" + vm.Name, Action: audit.ActionUnlock, Subject: vol.ID,
		Details: audit.Unlock{Volume: vol.ID, SessionID: id, Remote: remoteHost(r), NextKey: nextBlob != nil}}
	if use != nil && !s.now().Before(use.Expires.Add(challengeGrace/2)) {
		// Used challenges are purged challengeGrace after they expire: one
		// checked long ago could otherwise be recorded again, after its
		// first use was purged.
		s.refuse(w, r, vm.Name, vol.ID, &refusal{reason: api.ReasonChallenge, hint: "the challenge expired while the unlock was being verified; request a new one"})
		return
	}
	// An erase or revoke may have committed while this unlock was being
	// verified. The release record is durable before anything is read
	// again, and every write goes through one ordered writer, so whatever
	// committed before it is visible to a read after it: read the VM and
	// the volume again, and release nothing if either changed. (The chain
	// then holds the release record followed by the denial, which is what
	// took place.) Where the store can, that read rides in the commit's
	// round trip (AppendAuditUsingThenRead).
	var (
		reread      bool
		nowVM       store.VM
		nowVol      *store.Volume
		readErr     error
		ar, canRead = s.appendReader()
		va, canVia  = s.audit.(auditVia)
	)
	switch {
	case use != nil && canRead && canVia:
		reread = true
		_, err = va.AppendVia(ctx, ev, func(next store.AuditNext) error {
			v, vl, err := ar.AppendAuditUsingThenRead(ctx, *use, next, vm.Name, vol.ID)
			if errors.Is(err, store.ErrReadAfterAppend) {
				readErr = err
				return nil
			}
			nowVM, nowVol = v, vl
			return err
		})
	case use != nil:
		_, err = s.audit.AppendUsing(ctx, *use, ev)
	default:
		_, err = s.audit.Append(ctx, ev)
	}
	if errors.Is(err, store.ErrChallengeUsed) {
		s.refuse(w, r, vm.Name, vol.ID, replay)
		return
	}
	if err != nil {
		if unavailable(w, err) { // logged once, by the database monitor
			return
		}
		if s.keyStale(ctx) {
			// The chain moved to a master key this replica does not hold
			// (masterkey_follow.go): another replica can release it.
			staleAnswer(w, s.staleMessage())
			return
		}
		s.log.Error("audit append failed; unwrap key withheld", slog.String("vm", vm.Name), slog.String("volume", vol.ID), slog.Any("err", err))
		writeError(w, errorf(http.StatusInternalServerError, "the operator must run `keysvc audit verify` and repair the audit chain", "the release could not be audited, so no key is released"))
		return
	}
	var f *refusal
	if !reread {
		nowVM, nowVol, readErr = s.vmAndVolume(ctx, vm.Name, vol.ID)
	}
	if readErr == nil {
		f = stillReleasable(vm, nowVM, nowVol)
	}
	if readErr != nil || f != nil {
		if readErr != nil {
			s.readFailed(w, r, vm.Name, vol.ID, readErr)
		} else {
			s.refuse(w, r, vm.Name, vol.ID, f)
		}
		return
	}
	s.metrics.unlocks.Inc()
	s.log.Info("unlock", slog.String("vm", vm.Name), slog.String("volume", vol.ID), slog.String("session_id", id), slog.Any("pcrs", idx))
	writeJSON(w, http.StatusOK, api.UnlockResponse{ImportBlob: blobBytes, Session: sess, PCRs: idx, NextImportBlob: nextBlob, RotationCancelling: cancelling})
}

// stillReleasable checks the VM and the volume as read again after a
// release was recorded (vm, vol), to catch a revoke, an erase or any
// change to what the unlock was verified against that raced the
// verification. verified is the VM as the unlock read it, with the policy
// it verified against: the re-read EK, AK and policy must be exactly those,
// not merely still parse (a new AK or policy committed meanwhile would
// otherwise ride on a quote checked against the old ones).
func stillReleasable(verified, vm store.VM, vol *store.Volume) *refusal {
	// The same checks as before verification: revoked, EK and AK still enrolled.
	if _, _, f := enrolledKeys(vm, nil, nil); f != nil {
		return f
	}
	switch {
	case vm.EKPubPEM != verified.EKPubPEM:
		return &refusal{reason: api.ReasonUnknownEK, hint: "the VM's enrolled EK changed while this unlock was verified; retry"}
	case vm.AKPubPEM != verified.AKPubPEM:
		return &refusal{reason: api.ReasonUnknownAK, hint: "the VM's enrolled AK changed while this unlock was verified; retry"}
	case !bytes.Equal(vm.Policy, verified.Policy):
		return &refusal{reason: api.ReasonPolicy, hint: "the VM's policy changed while this unlock was verified; retry against the new policy"}
	}
	return checkVolume(verified.Name, vol)
}

// appendThenReader appends an unlock's release record and then reads the
// VM and the volume again (store.Backend.AppendAuditUsingThenRead); the
// Server's authStore implements it.
type appendThenReader interface {
	AppendAuditUsingThenRead(ctx context.Context, use store.ChallengeUse, next store.AuditNext, vm, id string) (store.VM, *store.Volume, error)
}

// appendReader returns the Server's store (the authStore New wraps every
// store in) as an appendThenReader, if the store under it is one.
func (s *Server) appendReader() (appendThenReader, bool) {
	a := s.st.(*authStore)
	_, ok := a.Store.(appendThenReader)
	return a, ok
}

// readFailed answers a failed read of a VM or volume: a row that fails its
// integrity check is refused (403 store-integrity) and raised as a
// critical event; anything else is a 500.
func (s *Server) readFailed(w http.ResponseWriter, r *http.Request, vm, volume string, err error) {
	if !errors.Is(err, ErrTampered) {
		s.internal(w, "read or update vm and volume", err)
		return
	}
	if s.keyStale(r.Context()) {
		// Not tampering: the rows moved to a master key this replica
		// does not hold (masterkey_follow.go).
		staleAnswer(w, s.staleMessage())
		return
	}
	s.tampered(r, vm, volume, err)
	s.refuse(w, r, vm, volume, &refusal{reason: api.ReasonIntegrity,
		hint: "the key service's records for this VM or volume fail their integrity check; an operator must run `keysvc audit verify`"})
}
