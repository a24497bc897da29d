package keysvc

import (
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strings"

	"github.com/google/go-tpm/legacy/tpm2"
	"github.com/google/go-tpm/legacy/tpm2/credactivation"

	"github.com/keygate/keygate/attest"
	"github.com/keygate/keygate/keysvc/api"
	"github.com/keygate/keygate/keysvc/audit"
	"github.com/keygate/keygate/keysvc/store"
)

// Credential activation proves that an AK lives in the same TPM as the
// enrolled EK, for a VM enrolled without an AK:
//
//  1. POST /v1/activate {vm, ek_pub, ak_public}: the service checks the EK
//     against the enrollment and the AK's public area (attest.CheckAKPublic),
//     and answers MakeCredential's output for (EK, name of the AK) around a
//     random secret, plus an activation token binding (vm, EK, AK, hash of
//     the secret, expiry).
//  2. The TPM releases the secret (TPM2_ActivateCredential) only if it holds
//     the EK's private key and an object with exactly that AK name.
//  3. POST /v1/activate/finish {activation, secret}: the service checks the
//     token and the secret and enrolls the AK.

type activationClaims struct {
	VM     string `json:"vm"`
	EK     string `json:"ek"`     // hex SHA-256 of the EK PKIX DER
	AK     string `json:"ak_pem"` // PEM of the AK to enroll
	Secret []byte `json:"h"`      // SHA-256 of the secret
	Exp    int64  `json:"exp"`    // Unix seconds
}

// activationLabel separates activation MACs from session MACs, which use
// the same key.
const activationLabel = "keygate activation v1\x00"

func (s *Server) activationMAC(payload []byte) []byte {
	return s.mac(append([]byte(activationLabel), payload...))
}

func (s *Server) handleActivate(w http.ResponseWriter, r *http.Request) {
	var req api.ActivateRequest
	if e := readJSON(w, r, api.MaxChallengeBody, &req); e != nil {
		writeError(w, e)
		return
	}
	ek, err := parsePublicKeyPEM("ek_pub", req.EKPub)
	if err != nil {
		writeError(w, errorf(http.StatusBadRequest, "", "%v", err))
		return
	}
	akPub, err := attest.CheckAKPublic(req.AKPublic)
	if err != nil {
		writeError(w, errorf(http.StatusBadRequest, "send the AK's TPMT_PUBLIC area", "ak_public: %v", err))
		return
	}
	pub, err := tpm2.DecodePublic(req.AKPublic)
	if err != nil {
		writeError(w, errorf(http.StatusBadRequest, "", "ak_public: %v", err))
		return
	}
	name, err := pub.Name()
	if err != nil || name.Digest == nil {
		writeError(w, errorf(http.StatusBadRequest, "", "ak_public: no name: %v", err))
		return
	}
	vm, err := s.st.GetVM(r.Context(), req.VM)
	if errors.Is(err, store.ErrNotFound) {
		s.refuse(w, r, req.VM, "", &refusal{reason: api.ReasonUnknownVM, hint: "enroll the VM with `keysvc vm enroll`"})
		return
	}
	if err != nil {
		s.readFailed(w, r, req.VM, "", err)
		return
	}
	if _, _, f := enrolledKeys(vm, ek, nil); f != nil && f.reason != api.ReasonNoAK {
		s.refuse(w, r, req.VM, "", f)
		return
	}
	if !s.allowVM(r, vm.Name) {
		tooMany(w, "VM")
		return
	}
	if vm.AKPubPEM != "" {
		s.refuse(w, r, req.VM, "", &refusal{reason: api.ReasonAKEnrolled, hint: "the VM has an AK; an administrator replaces it with `keysvc vm set-ak`"})
		return
	}
	akPEM, err := marshalPublicKeyPEM(akPub)
	if err != nil {
		writeError(w, errorf(http.StatusBadRequest, "", "ak_public: %v", err))
		return
	}
	secret := make([]byte, 32)
	rand.Read(secret)
	cred, encSecret, err := credactivation.Generate(name.Digest, ek, 16, secret)
	if err != nil {
		writeError(w, errorf(http.StatusBadRequest, "the EK must be an RSA-2048 or ECC P-256 key from the TCG default template", "make credential: %v", err))
		return
	}
	fp, _ := attest.KeyFingerprint(ek)
	h := sha256.Sum256(secret)
	clear(secret)
	payload, _ := json.Marshal(activationClaims{VM: vm.Name, EK: fmt.Sprintf("%x", fp), AK: akPEM, Secret: h[:], Exp: s.now().Add(s.ttl).Unix()})
	enc := base64.RawURLEncoding
	writeJSON(w, http.StatusOK, api.ActivateResponse{CredentialBlob: cred, EncryptedSecret: encSecret,
		Activation: "a1." + enc.EncodeToString(payload) + "." + enc.EncodeToString(s.activationMAC(payload))})
}

func (s *Server) handleActivateFinish(w http.ResponseWriter, r *http.Request) {
	var req api.ActivateFinishRequest
	if e := readJSON(w, r, api.MaxChallengeBody, &req); e != nil {
		writeError(w, e)
		return
	}
	var c activationClaims
	rest, ok := strings.CutPrefix(req.Activation, "a1.")
	p, m, ok2 := strings.Cut(rest, ".")
	enc := base64.RawURLEncoding.Strict()
	payload, err1 := enc.DecodeString(p)
	mac, err2 := enc.DecodeString(m)
	if !ok || !ok2 || err1 != nil || err2 != nil || !hmac.Equal(mac, s.activationMAC(payload)) || json.Unmarshal(payload, &c) != nil {
		s.refuse(w, r, "", "", &refusal{reason: api.ReasonChallenge, hint: "the activation token is not one POST /v1/activate returned"})
		return
	}
	if s.now().Unix() >= c.Exp {
		s.refuse(w, r, c.VM, "", &refusal{reason: api.ReasonChallenge, hint: "the activation token expired; start again with POST /v1/activate"})
		return
	}
	h := sha256.Sum256(req.Secret)
	if subtle.ConstantTimeCompare(h[:], c.Secret) != 1 {
		s.refuse(w, r, c.VM, "", &refusal{reason: api.ReasonUnknownAK, hint: "the secret is wrong: the AK is not in the TPM of the enrolled EK"})
		return
	}
	vm, err := s.st.UpdateVM(r.Context(), c.VM, func(v *store.VM) error {
		if fingerprint(v.EKPubPEM) != c.EK {
			return errEKChanged
		}
		if v.AKPubPEM != "" && v.AKPubPEM != c.AK {
			return errAKEnrolled
		}
		v.AKPubPEM = c.AK
		return nil
	})
	switch {
	case errors.Is(err, errEKChanged):
		s.refuse(w, r, c.VM, "", &refusal{reason: api.ReasonUnknownEK, hint: "the VM's enrolled EK changed during activation"})
		return
	case errors.Is(err, errAKEnrolled):
		s.refuse(w, r, c.VM, "", &refusal{reason: api.ReasonAKEnrolled, hint: "another AK was enrolled during activation"})
		return
	case err != nil:
		s.readFailed(w, r, c.VM, "", err)
		return
	}
	akFP := fingerprint(c.AK)
	s.record(r.Context(), audit.Event{Actor: "vm:" + vm.Name, Action: audit.ActionEnroll, Subject: vm.Name, Details: audit.Enroll{
		EKFingerprint: c.EK, AKFingerprint: akFP, AKProof: "credential-activation", Provisioning: vm.ProvisioningAllowed}})
	writeJSON(w, http.StatusOK, api.ActivateFinishResponse{AKFingerprint: akFP})
}

var (
	errEKChanged  = errors.New("enrolled EK changed")
	errAKEnrolled = errors.New("another AK is enrolled")
)
