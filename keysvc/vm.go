package keysvc

import (
	"bytes"
	"context"
	"crypto"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"strings"

	pb "github.com/google/go-tpm-tools/proto/attest"
	"google.golang.org/protobuf/proto"

	"github.com/keygate/keygate/attest"
	"github.com/keygate/keygate/keysvc/api"
	"github.com/keygate/keygate/keysvc/audit"
	"github.com/keygate/keygate/keysvc/store"
)

// refusal is a 403 answer: a Refusal body, or an attest.Denial.
type refusal struct {
	reason string
	hint   string
	denial *attest.Denial
}

func (s *Server) refuse(w http.ResponseWriter, r *http.Request, vm, volume string, f *refusal) {
	s.refuseUsing(w, r, vm, volume, f, nil)
}

// refuseUsing is refuse for an unlock whose challenge is checked but not yet
// recorded as used: use (if not nil) is recorded in the same transaction as
// the denial, so that a refused attempt uses its challenge up.
//
// Refusals are audited within a per-source budget (vmAudit): past it they
// are counted into a summary record, not recorded one by one, so that
// unauthenticated requests cannot flood the chain. The names recorded come
// from the request and are cut to the store's limit (capName).
func (s *Server) refuseUsing(w http.ResponseWriter, r *http.Request, vm, volume string, f *refusal, use *store.ChallengeUse) {
	s.metrics.denials.WithLabelValues(f.reason).Inc()
	vm, volume = capName(vm), capName(volume)
	remote := remoteHost(r)
	d := audit.Deny{Volume: volume, Reason: f.reason, Remote: remote}
	if f.denial != nil {
		d.Reason = f.reason + ": " + f.denial.Reason
		for _, m := range f.denial.Mismatches {
			d.Mismatches = append(d.Mismatches, audit.PCRMismatch{PCR: m.PCR, Allowed: m.Allowed, Got: m.Got})
		}
		for _, rf := range f.denial.Rules {
			d.Rules = append(d.Rules, rf.Rule)
		}
	} else if f.hint != "" {
		d.Reason = f.reason + ": " + f.hint
	}
	if vm == "" {
		vm = "unknown"
	}
	ev := audit.Event{Actor: "vm:" + vm, Action: audit.ActionDeny, Subject: volume, Details: d}
	if !s.vmAudit.take(r.Context(), remote, r.Method, auditPath(r.URL.Path), f.reason, s.now()) {
		// Over the source's budget: counted for its summary record. A
		// checked challenge must still be used up.
		if use != nil {
			if err := s.st.UseChallenge(context.WithoutCancel(r.Context()), use.ID, use.Expires); err != nil && !errors.Is(err, store.ErrChallengeUsed) {
				s.log.Error("record challenge use failed", slog.String("vm", vm), slog.Any("err", err))
			}
		}
	} else if use == nil {
		s.record(r.Context(), ev)
	} else if _, err := s.audit.AppendUsing(context.WithoutCancel(r.Context()), *use, ev); errors.Is(err, store.ErrChallengeUsed) {
		// A concurrent replay of this challenge was recorded first; the
		// answer is a refusal either way.
		s.record(r.Context(), ev)
	} else if err != nil {
		// The denial is not on record (a broken chain, an I/O error); the
		// challenge must still be used up, so that the evidence cannot be
		// tried against it again.
		s.log.Error("audit append failed", slog.String("action", string(ev.Action)), slog.String("subject", ev.Subject), slog.Any("err", err))
		if err := s.st.UseChallenge(context.WithoutCancel(r.Context()), use.ID, use.Expires); err != nil && !errors.Is(err, store.ErrChallengeUsed) {
			s.log.Error("record challenge use failed", slog.String("vm", vm), slog.Any("err", err))
		}
	}
	s.log.Warn("refused", slog.String("vm", vm), slog.String("volume", volume), slog.String("reason", f.reason), slog.String("path", r.URL.Path))
	if f.denial != nil {
		writeJSON(w, http.StatusForbidden, f.denial)
		return
	}
	writeJSON(w, http.StatusForbidden, api.Refusal{Reason: f.reason, Hint: f.hint})
}

// parsePublicKeyPEM parses one PEM "PUBLIC KEY" (PKIX) block.
func parsePublicKeyPEM(what, s string) (crypto.PublicKey, error) {
	blk, rest := pem.Decode([]byte(s))
	if blk == nil || blk.Type != "PUBLIC KEY" || strings.TrimSpace(string(rest)) != "" {
		return nil, fmt.Errorf("%s is not one PEM PUBLIC KEY block (print it with `keygate tpm ek|ak --tpm …`)", what)
	}
	pub, err := x509.ParsePKIXPublicKey(blk.Bytes)
	if err != nil {
		return nil, fmt.Errorf("%s: parse public key: %v", what, err)
	}
	return pub, nil
}

func marshalPublicKeyPEM(pub crypto.PublicKey) (string, error) {
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return "", err
	}
	return string(pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der})), nil
}

func sameKey(a, b crypto.PublicKey) bool {
	fa, err1 := attest.KeyFingerprint(a)
	fb, err2 := attest.KeyFingerprint(b)
	return err1 == nil && err2 == nil && fa == fb
}

// enrolledKeys checks that the VM may attest with ek and ak (ak may be nil
// to use the enrolled one) and returns the enrolled keys.
func enrolledKeys(vm store.VM, ek, ak crypto.PublicKey) (ekPub, akPub crypto.PublicKey, f *refusal) {
	if vm.Revoked {
		return nil, nil, &refusal{reason: api.ReasonRevoked, hint: "the VM was revoked by an administrator"}
	}
	ekPub, err := enrolledKey("enrolled EK", vm.EKPubPEM)
	if err != nil {
		return nil, nil, &refusal{reason: api.ReasonUnknownEK, hint: "the enrolled EK does not parse; re-enroll the VM"}
	}
	if ek != nil && !sameKey(ek, ekPub) {
		return nil, nil, &refusal{reason: api.ReasonUnknownEK, hint: "this EK is not the one enrolled for the VM; check the VM name, or enroll this TPM's EK"}
	}
	if vm.AKPubPEM == "" {
		return nil, nil, &refusal{reason: api.ReasonNoAK, hint: "no AK is enrolled for this VM: prove one by credential activation (POST /v1/activate), or have an administrator enroll it with `keysvc vm set-ak`"}
	}
	akPub, err = enrolledKey("enrolled AK", vm.AKPubPEM)
	if err != nil {
		return nil, nil, &refusal{reason: api.ReasonUnknownAK, hint: "the enrolled AK does not parse; re-enroll the VM"}
	}
	if ak != nil && !sameKey(ak, akPub) {
		return nil, nil, &refusal{reason: api.ReasonUnknownAK, hint: "this AK is not the one enrolled for the VM's TPM"}
	}
	return ekPub, akPub, nil
}

// vmVolumeReader reads a VM and a volume in one query. keysvc/store's
// backends implement it; for a Store that does not, authStore makes two
// reads.
type vmVolumeReader interface {
	// GetVMAndVolume returns the VM (store.ErrNotFound if none) and the
	// volume, nil if there is none.
	GetVMAndVolume(ctx context.Context, vm, id string) (store.VM, *store.Volume, error)
}

// vmVolumeChallengeReader also reads, in the same query, whether a challenge
// is used. keysvc/store's backends implement it.
type vmVolumeChallengeReader interface {
	GetVMAndVolumeUsing(ctx context.Context, vm, id, challenge string) (store.VM, *store.Volume, bool, error)
}

// unlockRead is an unlock's first read: the named VM, the volume id (nil if
// none), and whether the challenge whose ID is challenge is used. s.st is
// the authStore New wraps every store in, which reads all three in one
// query where the store can and in two reads where it cannot.
func (s *Server) unlockRead(ctx context.Context, vmName, id, challenge string) (store.VM, *store.Volume, bool, error) {
	return s.st.(*authStore).GetVMAndVolumeUsing(ctx, vmName, id, challenge)
}

// vmAndVolume reads the named VM and the volume id (nil if none), through
// the authStore New wraps every store in.
func (s *Server) vmAndVolume(ctx context.Context, vmName, id string) (store.VM, *store.Volume, error) {
	return s.st.(*authStore).GetVMAndVolume(ctx, vmName, id)
}

// checkVolume checks that vol (nil if it does not exist) is a volume of vm
// and still has a key.
func checkVolume(vm string, vol *store.Volume) *refusal {
	if vol == nil || vol.VM != vm {
		return &refusal{reason: api.ReasonUnknownVolume, hint: "no such volume for this VM; create or import it with `keysvc volume`"}
	}
	if vol.Erased() {
		return &refusal{reason: api.ReasonErased, hint: "the volume's key was destroyed (crypto-erase); only a recovery keyslot can open it"}
	}
	return nil
}

func (s *Server) handleChallenge(w http.ResponseWriter, r *http.Request) {
	var req api.ChallengeRequest
	if e := readJSON(w, r, api.MaxChallengeBody, &req); e != nil {
		writeError(w, e)
		return
	}
	if req.VM == "" || req.Volume == "" {
		writeError(w, errorf(http.StatusBadRequest, "", "vm and volume are required"))
		return
	}
	ek, err := parsePublicKeyPEM("ek_pub", req.EKPub)
	if err != nil {
		writeError(w, errorf(http.StatusBadRequest, "", "%v", err))
		return
	}
	ak, err := parsePublicKeyPEM("ak_pub", req.AKPub)
	if err != nil {
		writeError(w, errorf(http.StatusBadRequest, "", "%v", err))
		return
	}
	vm, vol, err := s.vmAndVolume(r.Context(), req.VM, req.Volume)
	if errors.Is(err, store.ErrNotFound) {
		s.refuse(w, r, req.VM, req.Volume, &refusal{reason: api.ReasonUnknownVM, hint: "enroll the VM with `keysvc vm enroll`"})
		return
	}
	if err != nil {
		s.readFailed(w, r, req.VM, req.Volume, err)
		return
	}
	if _, _, f := enrolledKeys(vm, ek, ak); f != nil {
		s.refuse(w, r, req.VM, req.Volume, f)
		return
	}
	if !s.allowVM(r, vm.Name) {
		tooMany(w, "VM")
		return
	}
	f := checkVolume(vm.Name, vol)
	if f != nil && f.reason == api.ReasonUnknownVolume && vm.ProvisioningAllowed {
		// A volume to provision: its ID must be one the store takes, or
		// the provision after the attestation would fail in the store.
		if err := store.ValidID("volume id", req.Volume); err != nil {
			f.hint = fmt.Sprintf("%v; provision the volume under such an id (keygate boot --volume)", err)
		} else {
			f = nil
		}
	}
	if f != nil {
		s.refuse(w, r, req.VM, req.Volume, f)
		return
	}
	nonce, token, err := s.chs.Load().cur.Issue(req.VM, req.Volume, ek, ak)
	if err != nil {
		writeError(w, errorf(http.StatusBadRequest, "", "%v", err))
		return
	}
	writeJSON(w, http.StatusOK, api.ChallengeResponse{Nonce: nonce, Challenge: token})
}

// peekNames reads the vm and volume names from a v1 challenge token without
// authenticating it (attest/challenge.go documents the layout), so that the
// enrolled keys can be looked up; Check then checks the MAC and the binding
// to exactly those keys.
func peekNames(token string) (vm, volume string, ok bool) {
	vm, volume, _, ok = peekToken(token)
	return vm, volume, ok
}

// peekToken is peekNames that also returns the token's nonce (its ID), so
// that the same read looks up whether it is used. Nothing is decided on
// the unauthenticated nonce: the lookup's answer counts only once Check
// has authenticated the payload it came from.
func peekToken(token string) (vm, volume string, nonce []byte, ok bool) {
	if len(token) > 4096 {
		return "", "", nil, false
	}
	parts := strings.Split(token, ".")
	if len(parts) != 3 || parts[0] != "v1" {
		return "", "", nil, false
	}
	b, err := base64.RawURLEncoding.DecodeString(parts[1])
	const fixed = 8 + 8 + attest.NonceSize + 32 + 32
	if err != nil || len(b) < fixed {
		return "", "", nil, false
	}
	nonce = b[16 : 16+attest.NonceSize]
	b = b[fixed:]
	name := func() (string, bool) {
		if len(b) < 2 {
			return "", false
		}
		n := int(binary.BigEndian.Uint16(b))
		if n > len(b)-2 {
			return "", false
		}
		s := string(b[2 : 2+n])
		b = b[2+n:]
		return s, true
	}
	vm, ok1 := name()
	volume, ok2 := name()
	return vm, volume, nonce, ok1 && ok2 && len(b) == 0
}

func (s *Server) handleUnlock(w http.ResponseWriter, r *http.Request) { s.unlock(w, r, false) }

// handleProvision is POST /v1/provision: an unlock of a volume that does not
// exist yet, for a VM allowed to provision (keygate boot --init-if-blank).
// After the same checks as an unlock, the service makes the volume's UK and
// releases it like an unlock.
func (s *Server) handleProvision(w http.ResponseWriter, r *http.Request) { s.unlock(w, r, true) }

func (s *Server) unlock(w http.ResponseWriter, r *http.Request, provision bool) {
	var req api.UnlockRequest
	if e := readJSON(w, r, api.MaxUnlockBody, &req); e != nil {
		writeError(w, e)
		return
	}
	ctx := r.Context()
	vmName, volID, nonce, ok := peekToken(req.Challenge)
	if !ok {
		s.refuse(w, r, "", "", &refusal{reason: api.ReasonChallenge, hint: "the challenge is not a keysvc challenge token; send the one POST /v1/challenge returned"})
		return
	}
	// The volume, and whether the challenge is used, are read here too, in
	// the same query, but checked only after the challenge is checked (so a
	// refused attempt uses it up); release reads the VM and the volume
	// again after the release is on record.
	vm, stored, used, err := s.unlockRead(ctx, vmName, volID, hex.EncodeToString(nonce))
	if errors.Is(err, store.ErrNotFound) {
		s.refuse(w, r, vmName, volID, &refusal{reason: api.ReasonUnknownVM, hint: "enroll the VM with `keysvc vm enroll`"})
		return
	}
	if err != nil {
		s.readFailed(w, r, vmName, volID, err)
		return
	}
	ekPub, akPub, f := enrolledKeys(vm, nil, nil)
	if f != nil {
		s.refuse(w, r, vmName, volID, f)
		return
	}
	claims, err := s.checkChallenge(req.Challenge, vmName, volID, ekPub, akPub)
	if err != nil {
		if isChallengeErr(err) {
			s.refuse(w, r, vmName, volID, &refusal{reason: api.ReasonChallenge, hint: err.Error()})
		} else {
			s.internal(w, "check challenge", err)
		}
		return
	}
	// From here until its outcome is written, this unlock is one the
	// store's group commit waits for (see New).
	s.unlocking.Add(1)
	defer s.unlocking.Add(-1)
	// The challenge is recorded as used in the same transaction as the
	// record of this attempt's outcome (release or refusal): one durable
	// write per unlock. A replay is refused here, before its evidence is
	// verified, if its first use is on record; a replay racing its first
	// use is refused by that transaction.
	use := &store.ChallengeUse{ID: hex.EncodeToString(claims.ID()), Expires: claims.Expiry}
	replay := &refusal{reason: api.ReasonChallenge, hint: attest.ErrChallengeReplayed.Error() + "; request a new challenge for every unlock"}
	if provision {
		// Provisioning writes the new volume before the release, so the
		// challenge must be used up before that.
		if err := s.st.UseChallenge(ctx, use.ID, use.Expires); errors.Is(err, store.ErrChallengeUsed) {
			s.refuse(w, r, vmName, volID, replay)
			return
		} else if err != nil {
			s.internal(w, "record challenge use", err)
			return
		}
		use = nil
	} else if !bytes.Equal(claims.ID(), nonce) {
		// Check authenticated the payload the nonce was peeked from, so
		// this cannot happen; if the token layout ever changes, refuse
		// rather than trust a lookup of something else.
		s.internal(w, "look up challenge", errors.New("the challenge's ID is not the nonce peeked from it"))
		return
	} else if used {
		s.refuse(w, r, vmName, volID, replay)
		return
	}
	deny := func(f *refusal) { s.refuseUsing(w, r, vmName, volID, f, use) }
	var vol store.Volume
	if provision {
		f = canProvision(vm, stored)
	} else if f = checkVolume(vmName, stored); f == nil {
		vol = *stored
	}
	if f != nil {
		deny(f)
		return
	}
	att := &pb.Attestation{}
	if err := proto.Unmarshal(req.Attestation, att); err != nil {
		deny(&refusal{reason: api.ReasonEvidence, hint: "attestation is not a go-tpm-tools Attestation proto: " + err.Error()})
		return
	}
	pol, res, f, err := s.verify(ctx, &vm, att, claims.Nonce, akPub)
	if err != nil || f != nil {
		if errors.Is(err, ErrTampered) {
			s.readFailed(w, r, vmName, volID, err)
		} else if err != nil {
			s.internal(w, "verify attestation", err)
		} else {
			deny(f)
		}
		return
	}
	if provision {
		if vol, err = s.provisionVolume(ctx, vm.Name, volID, ekPub); errors.Is(err, store.ErrExists) {
			s.refuse(w, r, vmName, volID, &refusal{reason: api.ReasonVolumeExists, hint: "the volume was provisioned meanwhile; unlock it"})
			return
		} else if err != nil {
			s.internal(w, "provision volume", err)
			return
		}
		fp, _ := attest.KeyFingerprint(ekPub)
		s.record(ctx, audit.Event{Actor: "vm:" + vm.Name, Action: audit.ActionProvision, Subject: volID,
			Details: audit.Volume{Volume: volID, VM: vm.Name, Source: "provisioned", EKFingerprint: hex.EncodeToString(fp[:])}})
	}
	s.release(w, r, vm, vol, ekPub, pol, res, use, replay)
}

// canProvision checks that vm may provision a volume, which must not exist
// (existing is nil).
func canProvision(vm store.VM, existing *store.Volume) *refusal {
	if !vm.ProvisioningAllowed {
		return &refusal{reason: api.ReasonNoProvisioning, hint: "this VM may not provision volumes; create the volume with `keysvc volume create`, or re-enroll the VM with provisioning allowed"}
	}
	if existing != nil {
		return &refusal{reason: api.ReasonVolumeExists, hint: "the volume exists; unlock it with POST /v1/unlock"}
	}
	return nil
}

// provisionVolume makes, seals and stores a new UK for volume id of vm,
// whose enrolled EK is ek.
func (s *Server) provisionVolume(ctx context.Context, vm, id string, ek crypto.PublicKey) (store.Volume, error) {
	fp, err := attest.KeyFingerprint(ek)
	if err != nil {
		return store.Volume{}, err
	}
	uk := make([]byte, api.UKSize)
	if _, err := rand.Read(uk); err != nil {
		return store.Volume{}, err
	}
	sealed, err := s.rows.seal(ukRecordID(id, vm, hex.EncodeToString(fp[:])), uk)
	clear(uk)
	if err != nil {
		return store.Volume{}, err
	}
	return s.st.CreateVolume(ctx, store.Volume{ID: id, VM: vm, SealedUK: sealed})
}

func isChallengeErr(err error) bool {
	for _, e := range []error{attest.ErrChallengeMalformed, attest.ErrChallengeMAC, attest.ErrChallengeBinding, attest.ErrChallengeExpired, attest.ErrChallengeReplayed} {
		if errors.Is(err, e) {
			return true
		}
	}
	return false
}

// errNotArmed means learn mode was consumed by a concurrent unlock.
var errNotArmed = errors.New("learn mode no longer armed")

// verify runs attest.Verify against the VM's policy, or, with learn mode
// armed, attest.Learn, and then stores the captured policy and disarms. On
// success vm.Policy is the stored policy it verified against (the learned
// one, if it learned), for the re-check after the release (stillReleasable).
func (s *Server) verify(ctx context.Context, vm *store.VM, att *pb.Attestation, nonce []byte, ak crypto.PublicKey) (*attest.Policy, *attest.Result, *refusal, error) {
	pol, err := releasePolicy(vm.Policy)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("vm %q: stored policy: %w", vm.Name, err)
	}
	opts := attest.VerifyOpts{Nonce: api.QuoteData(nonce, s.caSum), TrustedAKs: []crypto.PublicKey{ak}, Policy: pol}
	if vm.LearnArmed {
		learned, res, err := attest.Learn(att, opts, s.learnPCRs)
		if err == nil && !bytes.Equal(res.PCRs[WindowPCR], windowReset) {
			// Learning now would allow only the state after an unlock.
			return nil, nil, &refusal{reason: api.ReasonPolicy, hint: fmt.Sprintf("learn mode stays armed: PCR %d is already extended in this boot (an unlock happened); learn from a freshly booted VM", WindowPCR)}, nil
		}
		if err == nil {
			raw, merr := json.Marshal(learned)
			if merr != nil {
				return nil, nil, nil, merr
			}
			_, uerr := s.st.UpdateVM(ctx, vm.Name, func(v *store.VM) error {
				if !v.LearnArmed {
					return errNotArmed
				}
				v.Policy, v.LearnArmed = raw, false
				return nil
			})
			switch {
			case uerr == nil:
				vm.Policy, vm.LearnArmed = raw, false
				pcrs := make(map[int]string, len(learned.PCRs))
				for i, vals := range learned.PCRs {
					pcrs[i] = fmt.Sprintf("%x", vals[0])
				}
				s.record(ctx, audit.Event{Actor: "vm:" + vm.Name, Action: audit.ActionLearn, Subject: vm.Name, Details: audit.Learn{PCRs: pcrs, Policy: raw, SHA256: fmt.Sprintf("%x", sha256.Sum256(raw))}})
				s.log.Info("learned policy", slog.String("vm", vm.Name), slog.Int("pcrs", len(pcrs)))
				// Learn captures only s.learnPCRs; the release is bound to
				// the window all the same.
				return withWindow(learned), res, nil, nil
			case errors.Is(uerr, errNotArmed):
				// Another unlock captured the policy first: verify against it.
				fresh, err := s.st.GetVM(ctx, vm.Name)
				if err != nil {
					return nil, nil, nil, err
				}
				if fresh.EKPubPEM != vm.EKPubPEM || fresh.AKPubPEM != vm.AKPubPEM || fresh.Revoked {
					return nil, nil, &refusal{reason: api.ReasonPolicy, hint: "the VM's enrollment changed during this unlock; retry"}, nil
				}
				vm.LearnArmed, vm.Policy = false, fresh.Policy
				return s.verify(ctx, vm, att, nonce, ak)
			default:
				return nil, nil, nil, uerr
			}
		}
		return nil, nil, verifyRefusal(err), nil
	}
	res, err := attest.Verify(att, opts)
	if err != nil {
		return nil, nil, verifyRefusal(err), nil
	}
	return pol, res, nil, nil
}

func verifyRefusal(err error) *refusal {
	var d *attest.Denial
	if errors.As(err, &d) {
		return &refusal{reason: api.ReasonPolicy, denial: d}
	}
	if errors.Is(err, attest.ErrUntrustedAK) {
		return &refusal{reason: api.ReasonUnknownAK, hint: err.Error()}
	}
	if errors.Is(err, attest.ErrQualifyingData) {
		return &refusal{reason: api.ReasonEvidence, hint: err.Error() + " bound to this service's CA: the VM trusts another CA for it (compare the CA sha256 that `keygate disk info IMAGE` shows for the volume's keygate token, or the VM's --ca, with the one `keysvc serve` logs as ca_sha256), or reached it through a relay"}
	}
	return &refusal{reason: api.ReasonEvidence, hint: err.Error()}
}

// internal answers 500 and logs the cause (never a secret: causes are
// store, sealing and encoding errors).
func (s *Server) internal(w http.ResponseWriter, what string, err error) {
	if unavailable(w, err) {
		return
	}
	s.log.Error("internal error", slog.String("op", what), slog.Any("err", err))
	writeError(w, errorf(http.StatusInternalServerError, "see the key service's log", "%s failed", what))
}
