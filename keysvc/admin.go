package keysvc

import (
	"bytes"
	"crypto"
	"crypto/rand"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"net/http"
	"strconv"

	"github.com/keygate/keygate/attest"
	"github.com/keygate/keygate/keysvc/api"
	"github.com/keygate/keygate/keysvc/audit"
	"github.com/keygate/keygate/keysvc/store"
	"github.com/keygate/keygate/tpm/importblob"
)

// adminRoutes registers the admin endpoints. Every handler that changes
// state appends its action record with intend before it changes anything,
// and changes nothing if that append fails (fail-closed). Reads (list, show,
// audit) are recorded only by requireAdmin's best-effort outcome record.
func (s *Server) adminRoutes(mux *http.ServeMux) {
	mux.HandleFunc("POST /v1/admin/vms", s.adminEnroll)
	mux.HandleFunc("GET /v1/admin/vms", s.adminListVMs)
	mux.HandleFunc("GET /v1/admin/vms/{name}", s.adminShowVM)
	mux.HandleFunc("PUT /v1/admin/vms/{name}/ak", s.adminSetAK)
	mux.HandleFunc("POST /v1/admin/vms/{name}/revoke", s.adminRevoke)
	mux.HandleFunc("GET /v1/admin/vms/{name}/policy", s.adminShowPolicy)
	mux.HandleFunc("PUT /v1/admin/vms/{name}/policy", s.adminSetPolicy)
	mux.HandleFunc("POST /v1/admin/vms/{name}/policy/learn", s.adminLearn)
	mux.HandleFunc("POST /v1/admin/volumes", s.adminVolume)
	mux.HandleFunc("GET /v1/admin/volumes", s.adminListVolumes)
	mux.HandleFunc("GET /v1/admin/volumes/{id}", s.adminShowVolume)
	mux.HandleFunc("POST /v1/admin/volumes/{id}/erase", s.adminErase)
	mux.HandleFunc("POST /v1/admin/volumes/{id}/rotate", s.adminRotate)
	mux.HandleFunc("POST /v1/admin/volumes/{id}/rotate/cancel", s.adminCancelRotation)
	mux.HandleFunc("GET /v1/admin/audit", s.adminAuditList)
	mux.HandleFunc("GET /v1/admin/audit/verify", s.adminAuditVerify)
	mux.HandleFunc("GET /v1/admin/events", s.adminListEvents)
	mux.HandleFunc("GET /v1/admin/master-key", s.adminMasterKey)
	mux.HandleFunc("POST /v1/admin/master-key/rotate", s.adminRotateMasterKey)
	mux.HandleFunc("GET /v1/admin/events/stream", s.adminStreamEvents)
}

func fingerprint(pemText string) string {
	pub, err := parsePublicKeyPEM("key", pemText)
	if err != nil {
		return ""
	}
	fp, err := attest.KeyFingerprint(pub)
	if err != nil {
		return ""
	}
	return fmt.Sprintf("%x", fp)
}

func vmInfo(v store.VM) api.VMInfo {
	pol := v.Policy
	if len(pol) == 0 {
		pol = json.RawMessage("{}")
	}
	info := api.VMInfo{Name: v.Name, EKPub: v.EKPubPEM, AKPub: v.AKPubPEM, EKFingerprint: fingerprint(v.EKPubPEM),
		AKFingerprint: fingerprint(v.AKPubPEM), ProvisioningAllowed: v.ProvisioningAllowed, Revoked: v.Revoked,
		LearnArmed: v.LearnArmed, Policy: pol, Created: v.Created, Updated: v.Updated}
	if v.AKPubPEM == "" {
		info.Next = "no AK enrolled: unlocks are refused until one is; the VM proves its AK by credential activation against the EK (POST /v1/activate), or enroll a trusted AK (from `keygate tpm ak`) with `keysvc vm set-ak --name " + v.Name + " --ak-pub FILE`"
	} else if p, err := storedPolicy(v.Policy); err == nil && len(p.PCRs) == 0 && !v.LearnArmed {
		info.Next = "no PCR policy: unlocks are denied; run `keysvc policy learn --vm " + v.Name + "` and boot the VM once, or `keysvc policy set`"
	}
	return info
}

func volumeInfo(v store.Volume) api.VolumeInfo {
	info := api.VolumeInfo{ID: v.ID, VM: v.VM, Erased: v.Erased(), Created: v.Created}
	if v.Erased() && !v.ErasedAt.IsZero() {
		t := v.ErasedAt
		info.ErasedAt = &t
	}
	return info
}

// storeError maps store sentinels to HTTP answers.
func (s *Server) storeError(w http.ResponseWriter, what string, err error) {
	switch {
	case errors.Is(err, store.ErrNotFound):
		writeError(w, errorf(http.StatusNotFound, "list what exists with the matching list command", "%s: not found", what))
	case errors.Is(err, store.ErrExists):
		writeError(w, errorf(http.StatusConflict, "pick another name, or show the existing one", "%s: already exists", what))
	case errors.Is(err, store.ErrImmutable):
		writeError(w, errorf(http.StatusConflict, "", "%s: %v", what, err))
	case errors.Is(err, ErrTampered):
		// Not changed: a change would re-MAC what someone else wrote.
		writeError(w, errorf(http.StatusConflict, "run `keysvc audit verify`; restore the database from a backup, or enroll the VM again under a new name", "%s: %v", what, err))
	default:
		s.internal(w, what, err)
	}
}

func (s *Server) adminEnroll(w http.ResponseWriter, r *http.Request) {
	var req api.EnrollRequest
	if e := readJSON(w, r, api.MaxAdminBody, &req); e != nil {
		writeError(w, e)
		return
	}
	if err := store.ValidID("vm name", req.Name); err != nil {
		writeError(w, errorf(http.StatusBadRequest, "pick a name of 1 to 128 letters, digits and . _ : -", "%v", err))
		return
	}
	ek, ekPEM, he := s.enrollEK(req)
	if he != nil {
		writeError(w, he)
		return
	}
	d := audit.Enroll{Provisioning: req.ProvisioningAllowed}
	fp, _ := attest.KeyFingerprint(ek)
	d.EKFingerprint = fmt.Sprintf("%x", fp)
	if req.AKPub != "" {
		ak, err := parsePublicKeyPEM("ak_pub", req.AKPub)
		if err != nil {
			writeError(w, errorf(http.StatusBadRequest, "", "%v", err))
			return
		}
		fp, _ := attest.KeyFingerprint(ak)
		d.AKFingerprint, d.AKProof = fmt.Sprintf("%x", fp), "enrolled"
	}
	if !s.intend(w, r, audit.Event{Actor: "admin", Action: audit.ActionEnroll, Subject: req.Name, Details: d}) {
		return
	}
	vm, err := s.st.CreateVM(r.Context(), store.VM{Name: req.Name, EKPubPEM: ekPEM, AKPubPEM: req.AKPub,
		ProvisioningAllowed: req.ProvisioningAllowed, Policy: json.RawMessage("{}")})
	if err != nil {
		s.storeError(w, "enroll vm "+strconv.Quote(req.Name), err)
		return
	}
	writeJSON(w, http.StatusCreated, vmInfo(vm))
}

// enrollEK returns the EK an enrollment names, from ek_pub or from an
// ek_cert that chains to the EK roots (both: they must agree).
func (s *Server) enrollEK(req api.EnrollRequest) (crypto.PublicKey, string, *httpError) {
	if req.EKPub == "" && req.EKCert == "" {
		return nil, "", errorf(http.StatusBadRequest, "print them with `keygate tpm ek`", "ek_pub or ek_cert is required")
	}
	var ek crypto.PublicKey
	if req.EKPub != "" {
		var err error
		if ek, err = parsePublicKeyPEM("ek_pub", req.EKPub); err != nil {
			return nil, "", errorf(http.StatusBadRequest, "", "%v", err)
		}
	}
	if req.EKCert == "" {
		return ek, req.EKPub, nil
	}
	cert, err := verifyEKCert(req.EKCert, s.ekRoots, s.now())
	if err != nil {
		return nil, "", errorf(http.StatusBadRequest, "", "%v", err)
	}
	if ek != nil && !sameKey(ek, cert.PublicKey) {
		return nil, "", errorf(http.StatusBadRequest, "send one of them, or the matching pair", "ek_pub is not the key of ek_cert")
	}
	der, err := x509.MarshalPKIXPublicKey(cert.PublicKey)
	if err != nil {
		return nil, "", errorf(http.StatusBadRequest, "", "ek_cert key: %v", err)
	}
	return cert.PublicKey, string(pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der})), nil
}

// adminSetAK enrolls (or replaces) a VM's AK. The operator vouches for it,
// as for an AK given at enrollment.
func (s *Server) adminSetAK(w http.ResponseWriter, r *http.Request) {
	var req api.SetAKRequest
	if e := readJSON(w, r, api.MaxAdminBody, &req); e != nil {
		writeError(w, e)
		return
	}
	ak, err := parsePublicKeyPEM("ak_pub", req.AKPub)
	if err != nil {
		writeError(w, errorf(http.StatusBadRequest, "", "%v", err))
		return
	}
	name := r.PathValue("name")
	cur, ok := s.existingVM(w, r, "set AK of vm", name)
	if !ok {
		return
	}
	fp, _ := attest.KeyFingerprint(ak)
	if !s.intend(w, r, audit.Event{Actor: "admin", Action: audit.ActionEnroll, Subject: name, Details: audit.Enroll{
		EKFingerprint: fingerprint(cur.EKPubPEM), AKFingerprint: fmt.Sprintf("%x", fp), AKProof: "enrolled", Provisioning: cur.ProvisioningAllowed}}) {
		return
	}
	vm, err := s.st.UpdateVM(r.Context(), name, func(v *store.VM) error { v.AKPubPEM = req.AKPub; return nil })
	if err != nil {
		s.storeError(w, "set AK of vm "+strconv.Quote(name), err)
		return
	}
	writeJSON(w, http.StatusOK, vmInfo(vm))
}

func (s *Server) adminListVMs(w http.ResponseWriter, r *http.Request) {
	vms, err := s.st.ListVMs(r.Context())
	if err != nil {
		s.internal(w, "list vms", err)
		return
	}
	out := make([]api.VMInfo, 0, len(vms))
	for _, v := range vms {
		info := vmInfo(v)
		// Lists read the rows unchecked (they decide nothing), so that a
		// tampered row can be seen; it is flagged here.
		if err := s.rows.checkVM(v); err != nil {
			info.Tampered = err.Error()
		}
		out = append(out, info)
	}
	writeJSON(w, http.StatusOK, out)
}

func (s *Server) adminShowVM(w http.ResponseWriter, r *http.Request) {
	vm, err := s.st.GetVM(r.Context(), r.PathValue("name"))
	if err != nil {
		s.storeError(w, "vm "+strconv.Quote(r.PathValue("name")), err)
		return
	}
	writeJSON(w, http.StatusOK, vmInfo(vm))
}

// existingVM reads the named VM for a change, answering 404 (and
// returning false) if there is none, so that no action record is written
// for a VM that does not exist. VMs are never deleted, so it cannot vanish
// between this read and the change.
func (s *Server) existingVM(w http.ResponseWriter, r *http.Request, what, name string) (store.VM, bool) {
	vm, err := s.st.GetVM(r.Context(), name)
	if err != nil {
		s.storeError(w, what+" "+strconv.Quote(name), err)
		return store.VM{}, false
	}
	return vm, true
}

func (s *Server) adminShowPolicy(w http.ResponseWriter, r *http.Request) {
	vm, err := s.st.GetVM(r.Context(), r.PathValue("name"))
	if err != nil {
		s.storeError(w, "vm "+strconv.Quote(r.PathValue("name")), err)
		return
	}
	writeJSON(w, http.StatusOK, vmInfo(vm).Policy)
}

func (s *Server) adminSetPolicy(w http.ResponseWriter, r *http.Request) {
	var raw json.RawMessage
	if e := readJSON(w, r, api.MaxAdminBody, &raw); e != nil {
		writeError(w, e)
		return
	}
	pol, err := attest.ParsePolicy(raw)
	if err != nil {
		writeError(w, errorf(http.StatusBadRequest, `see docs/protocol.md: {"pcrs": {"7": ["<64 hex>"]}}`, "%v", err))
		return
	}
	if err := checkWindowPolicy(pol); err != nil {
		writeError(w, errorf(http.StatusBadRequest, "", "%v", err))
		return
	}
	// Stored with the window bound, so that `policy show` shows what every
	// unlock is held to (releasePolicy binds it anyway).
	canon, err := json.Marshal(withWindow(pol))
	if err != nil {
		s.internal(w, "encode policy", err)
		return
	}
	name := r.PathValue("name")
	cur, ok := s.existingVM(w, r, "set policy of vm", name)
	if !ok {
		return
	}
	if !s.intend(w, r, audit.Event{Actor: "admin", Action: audit.ActionPolicy, Subject: name, Details: policyChange(cur.Policy, canon)}) {
		return
	}
	vm, err := s.st.UpdateVM(r.Context(), name, func(v *store.VM) error {
		// The record names the change from cur; refuse if another
		// change came first, rather than record a wrong diff.
		if !bytes.Equal(v.Policy, cur.Policy) {
			return fmt.Errorf("the policy changed meanwhile: %w", store.ErrImmutable)
		}
		v.Policy, v.LearnArmed = canon, false
		return nil
	})
	if err != nil {
		s.storeError(w, "set policy of vm "+strconv.Quote(name), err)
		return
	}
	writeJSON(w, http.StatusOK, vmInfo(vm).Policy)
}

// api.MaxKeyFile is what an import blob can carry: an imported key file
// longer than that would be stored and then fail every unlock.
var (
	_ [api.MaxKeyFile - importblob.MaxSecret]struct{}
	_ [importblob.MaxSecret - api.MaxKeyFile]struct{}
)

func (s *Server) adminVolume(w http.ResponseWriter, r *http.Request) {
	var req api.VolumeRequest
	if e := readSecretJSON(w, r, api.MaxAdminBody, &req); e != nil {
		clear(req.Key)
		writeError(w, e)
		return
	}
	defer clear(req.Key) // on every refusal below, too
	if req.VM == "" {
		writeError(w, errorf(http.StatusBadRequest, "", "vm is required"))
		return
	}
	if err := store.ValidID("volume id", req.ID); err != nil {
		writeError(w, errorf(http.StatusBadRequest, "pick an id of 1 to 128 letters, digits and . _ : -", "%v", err))
		return
	}
	owner, err := s.st.GetVM(r.Context(), req.VM)
	if err != nil {
		clear(req.Key)
		if errors.Is(err, store.ErrNotFound) {
			writeError(w, errorf(http.StatusNotFound, "enroll the VM first with `keysvc vm enroll`", "vm %q is not enrolled", req.VM))
			return
		}
		s.storeError(w, "vm "+strconv.Quote(req.VM), err)
		return
	}
	key := req.Key
	imported := key != nil
	if imported && len(key) == 0 {
		writeError(w, errorf(http.StatusBadRequest, "give a non-empty key file", "key file is empty"))
		return
	}
	if imported && len(key) > api.MaxKeyFile {
		writeError(w, errorf(http.StatusBadRequest, api.KeyFileHint,
			"key file is %d bytes; an unwrap key sealed to a TPM holds at most %d", len(key), api.MaxKeyFile))
		return
	}
	if !imported {
		key = make([]byte, api.UKSize)
		if _, err := rand.Read(key); err != nil {
			s.internal(w, "make unwrap key", err)
			return
		}
	}
	ekFP := fingerprint(owner.EKPubPEM)
	if ekFP == "" {
		clear(key)
		clear(req.Key)
		writeError(w, errorf(http.StatusConflict, "enroll the VM again", "vm %q: its enrolled EK does not parse", req.VM))
		return
	}
	// Bound to the volume, its owner and the owner's EK (rowauth.go).
	sealed, err := s.rows.seal(ukRecordID(req.ID, req.VM, ekFP), key)
	clear(key)
	clear(req.Key)
	if err != nil {
		s.internal(w, "seal unwrap key", err)
		return
	}
	source := "created"
	if imported {
		source = "imported"
	}
	if !s.intend(w, r, audit.Event{Actor: "admin", Action: audit.ActionVolume, Subject: req.ID,
		Details: audit.Volume{Volume: req.ID, VM: req.VM, Source: source, EKFingerprint: ekFP}}) {
		return
	}
	vol, err := s.st.CreateVolume(r.Context(), store.Volume{ID: req.ID, VM: req.VM, SealedUK: sealed})
	if err != nil {
		if errors.Is(err, store.ErrNotFound) {
			writeError(w, errorf(http.StatusNotFound, "enroll the VM first with `keysvc vm enroll`", "vm %q is not enrolled", req.VM))
			return
		}
		s.storeError(w, "volume "+strconv.Quote(req.ID), err)
		return
	}
	writeJSON(w, http.StatusCreated, volumeInfo(vol))
}

func (s *Server) adminListVolumes(w http.ResponseWriter, r *http.Request) {
	vols, err := s.st.ListVolumes(r.Context(), r.URL.Query().Get("vm"))
	if err != nil {
		s.internal(w, "list volumes", err)
		return
	}
	out := make([]api.VolumeInfo, 0, len(vols))
	for _, v := range vols {
		info := volumeInfo(v)
		if err := s.rows.checkVolume(v); err != nil {
			info.Tampered = err.Error()
		}
		out = append(out, info)
	}
	s.withRotations(r.Context(), out)
	writeJSON(w, http.StatusOK, out)
}

func (s *Server) adminShowVolume(w http.ResponseWriter, r *http.Request) {
	vol, err := s.st.GetVolume(r.Context(), r.PathValue("id"))
	if err != nil {
		s.storeError(w, "volume "+strconv.Quote(r.PathValue("id")), err)
		return
	}
	info := []api.VolumeInfo{volumeInfo(vol)}
	s.withRotations(r.Context(), info)
	writeJSON(w, http.StatusOK, info[0])
}

func (s *Server) adminAuditList(w http.ResponseWriter, r *http.Request) {
	from := uint64(1)
	if f := r.URL.Query().Get("from"); f != "" {
		n, err := strconv.ParseUint(f, 10, 64)
		if err != nil {
			writeError(w, errorf(http.StatusBadRequest, "", "from must be a record number"))
			return
		}
		from = n
	}
	const max = 1000
	out := []audit.Record{}
	errFull := errors.New("full")
	err := s.audit.Scan(r.Context(), from, func(rec audit.Record) error {
		if len(out) == max {
			return errFull
		}
		out = append(out, rec)
		return nil
	})
	if err != nil && !errors.Is(err, errFull) {
		s.internal(w, "read audit log", err)
		return
	}
	writeJSON(w, http.StatusOK, out)
}

func (s *Server) adminAuditVerify(w http.ResponseWriter, r *http.Request) {
	rep, err := s.audit.Verify(r.Context())
	if err != nil && !errors.Is(err, audit.ErrTampered) {
		s.internal(w, "verify audit log", err)
		return
	}
	out := api.AuditVerifyResponse{OK: rep.OK(), Records: rep.Records, LastSeq: rep.LastSeq, Head: rep.Head, Problems: []string{}, Omitted: rep.Omitted, Retired: rep.Retired}
	for _, p := range rep.Problems {
		out.Problems = append(out.Problems, p.String())
	}
	// What the chain alone cannot show: the anchor, a wiped chain, and
	// rows changed outside the service.
	more, err := s.verifyStore(r.Context(), rep)
	if err != nil {
		s.internal(w, "verify stored records", err)
		return
	}
	out.Problems = append(out.Problems, more...)
	out.OK = out.OK && len(more) == 0
	writeJSON(w, http.StatusOK, out)
}
