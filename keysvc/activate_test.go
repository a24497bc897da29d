//go:build cgo

package keysvc_test

import (
	"bytes"
	"encoding/hex"
	"encoding/json"
	"net/http"
	"testing"

	"github.com/google/go-tpm-tools/client"
	tpmpb "github.com/google/go-tpm-tools/proto/tpm"
	"github.com/google/go-tpm-tools/simulator"
	"github.com/google/go-tpm/legacy/tpm2"
	"google.golang.org/protobuf/proto"

	"github.com/keygate/keygate/keysvc/api"
	"github.com/keygate/keygate/tpm"
)

// TestCredentialActivation enrolls a VM by its EK alone, has its TPM prove
// its AK by credential activation, and then unlocks with that AK. The TPM
// side is go-tpm's raw commands on the simulator, since package tpm does
// not offer ActivateCredential.
func TestCredentialActivation(t *testing.T) {
	e := startEnv(t, t.TempDir())
	sim, err := simulator.Get()
	if err != nil {
		t.Fatalf("simulator: %v", err)
	}
	t.Cleanup(func() { sim.Close() })
	ek, err := client.EndorsementKeyECC(sim)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(ek.Close)
	ak, err := client.AttestationKeyECC(sim)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(ak.Close)
	ekPEM, _ := tpm.MarshalPublicKeyPEM(ek.PublicKey())
	akPEM, _ := tpm.MarshalPublicKeyPEM(ak.PublicKey())
	akArea, err := ak.PublicArea().Encode()
	if err != nil {
		t.Fatal(err)
	}
	pcr7, err := tpm2.ReadPCR(sim, 7, tpm2.AlgSHA256)
	if err != nil {
		t.Fatal(err)
	}
	e.admin(t, "POST", "/v1/admin/vms", api.EnrollRequest{Name: "act", EKPub: string(ekPEM)}, http.StatusCreated)
	e.admin(t, "POST", "/v1/admin/volumes", api.VolumeRequest{ID: "act-vol", VM: "act", Key: ukBytes}, http.StatusCreated)
	e.admin(t, "PUT", "/v1/admin/vms/act/policy", map[string]any{"pcrs": map[string][]string{"7": {hex.EncodeToString(pcr7)}}}, http.StatusOK)

	start := func() api.ActivateResponse {
		code, body := e.vm(t, "POST", "/v1/activate", api.ActivateRequest{VM: "act", EKPub: string(ekPEM), AKPublic: akArea})
		if code != http.StatusOK {
			t.Fatalf("activate: %d %s", code, body)
		}
		var ar api.ActivateResponse
		json.Unmarshal(body, &ar)
		return ar
	}

	// A secret the TPM did not release is refused.
	ar := start()
	code, body := e.vm(t, "POST", "/v1/activate/finish", api.ActivateFinishRequest{Activation: ar.Activation, Secret: make([]byte, 32)})
	wantRefusal(t, code, body, api.ReasonUnknownAK)

	ar = start()
	sess, _, err := tpm2.StartAuthSession(sim, tpm2.HandleNull, tpm2.HandleNull, make([]byte, 16), nil, tpm2.SessionPolicy, tpm2.AlgNull, tpm2.AlgSHA256)
	if err != nil {
		t.Fatal(err)
	}
	defer tpm2.FlushContext(sim, sess)
	if _, _, err := tpm2.PolicySecret(sim, tpm2.HandleEndorsement, tpm2.AuthCommand{Session: tpm2.HandlePasswordSession, Attributes: tpm2.AttrContinueSession}, sess, nil, nil, nil, 0); err != nil {
		t.Fatal(err)
	}
	secret, err := tpm2.ActivateCredentialUsingAuth(sim, []tpm2.AuthCommand{
		{Session: tpm2.HandlePasswordSession, Attributes: tpm2.AttrContinueSession},
		{Session: sess, Attributes: tpm2.AttrContinueSession},
	}, ak.Handle(), ek.Handle(), ar.CredentialBlob[2:], ar.EncryptedSecret[2:])
	if err != nil {
		t.Fatalf("TPM2_ActivateCredential: %v", err)
	}
	code, body = e.vm(t, "POST", "/v1/activate/finish", api.ActivateFinishRequest{Activation: ar.Activation, Secret: secret})
	if code != http.StatusOK {
		t.Fatalf("activate finish: %d %s", code, body)
	}
	code, body = e.vm(t, "POST", "/v1/activate", api.ActivateRequest{VM: "act", EKPub: string(ekPEM), AKPublic: akArea})
	wantRefusal(t, code, body, api.ReasonAKEnrolled)

	// The proven AK now unlocks.
	code, body = e.vm(t, "POST", "/v1/challenge", api.ChallengeRequest{VM: "act", Volume: "act-vol", EKPub: string(ekPEM), AKPub: string(akPEM)})
	if code != http.StatusOK {
		t.Fatalf("challenge: %d %s", code, body)
	}
	var ch api.ChallengeResponse
	json.Unmarshal(body, &ch)
	att, err := ak.Attest(client.AttestOpts{Nonce: api.QuoteData(ch.Nonce, e.ca), TCGEventLog: []byte{}})
	if err != nil {
		t.Fatal(err)
	}
	raw, _ := proto.Marshal(att)
	code, body = e.vm(t, "POST", "/v1/unlock", api.UnlockRequest{Challenge: ch.Challenge, Attestation: raw})
	if code != http.StatusOK {
		t.Fatalf("unlock: %d %s", code, body)
	}
	var ur api.UnlockResponse
	json.Unmarshal(body, &ur)
	blob := &tpmpb.ImportBlob{}
	if err := proto.Unmarshal(ur.ImportBlob, blob); err != nil {
		t.Fatal(err)
	}
	uk, err := ek.Import(blob)
	if err != nil || !bytes.Equal(uk, ukBytes) {
		t.Fatalf("import: %v", err)
	}
	var recs []struct{ Details json.RawMessage }
	json.Unmarshal(e.admin(t, "GET", "/v1/admin/audit", nil, http.StatusOK), &recs)
	found := false
	for _, r := range recs {
		found = found || bytes.Contains(r.Details, []byte(`"ak_proof":"credential-activation"`))
	}
	if !found {
		t.Fatal("the activation is not in the audit log")
	}
}
