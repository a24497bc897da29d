package attest_test

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"os"
	"path/filepath"
	"testing"

	"github.com/google/go-tpm-tools/client"
	pb "github.com/google/go-tpm-tools/proto/attest"
	"github.com/google/go-tpm-tools/simulator"
	"github.com/google/go-tpm/legacy/tpm2"
	"github.com/google/go-tpm/tpmutil"
	"google.golang.org/protobuf/proto"

	"github.com/keygate/keygate/attest"
)

// vm is a simulated VM's TPM with an ECC AK, as the tpm package makes one.
type vm struct {
	sim *simulator.Simulator
	ak  *client.Key
	ek  crypto.PublicKey
}

// newVM starts the in-process simulator (one at a time per process) and
// makes an EK and an AK. Everything is closed at the end of the test.
func newVM(t testing.TB) *vm {
	t.Helper()
	sim, err := simulator.Get()
	if err != nil {
		t.Fatalf("start TPM simulator: %v", err)
	}
	t.Cleanup(func() { sim.Close() })
	// Runs after the AK is closed (cleanups run last first): no transient
	// object may be left behind in the TPM.
	t.Cleanup(func() {
		h, err := client.Handles(sim, tpm2.HandleTypeTransient)
		if err != nil {
			t.Errorf("list transient handles: %v", err)
		} else if len(h) != 0 {
			t.Errorf("%d transient handles left in the TPM: %v", len(h), h)
		}
	})
	ek, err := client.EndorsementKeyECC(sim)
	if err != nil {
		t.Fatalf("EK: %v", err)
	}
	ekPub := ek.PublicKey()
	ek.Close()
	ak, err := client.AttestationKeyECC(sim)
	if err != nil {
		t.Fatalf("AK: %v", err)
	}
	t.Cleanup(ak.Close)
	return &vm{sim: sim, ak: ak, ek: ekPub}
}

func (v *vm) akPub() crypto.PublicKey { return v.ak.PublicKey() }

// attest quotes every PCR bank with nonce and no event log.
func (v *vm) attest(t testing.TB, nonce []byte) *pb.Attestation {
	t.Helper()
	// A non-nil empty log stops client from reading the host's log.
	att, err := v.ak.Attest(client.AttestOpts{Nonce: nonce, TCGEventLog: []byte{}})
	if err != nil {
		t.Fatalf("attest: %v", err)
	}
	return att
}

// extend extends PCR pcr in the SHA-256 bank with the hash of data.
func (v *vm) extend(t testing.TB, pcr int, data string) {
	t.Helper()
	d := sha256.Sum256([]byte(data))
	if err := tpm2.PCRExtend(v.sim, tpmutil.Handle(pcr), tpm2.AlgSHA256, d[:], ""); err != nil {
		t.Fatalf("extend PCR %d: %v", pcr, err)
	}
}

// pcr reads PCR pcr of the SHA-256 bank.
func (v *vm) pcr(t testing.TB, pcr int) []byte {
	t.Helper()
	val, err := tpm2.ReadPCR(v.sim, pcr, tpm2.AlgSHA256)
	if err != nil {
		t.Fatalf("read PCR %d: %v", pcr, err)
	}
	return val
}

func randomKey(t testing.TB) crypto.PublicKey {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k.Public()
}

// recorded loads a recorded attestation from testdata.
func recorded(t testing.TB, name string) *pb.Attestation {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("testdata", name))
	if err != nil {
		t.Fatal(err)
	}
	att := &pb.Attestation{}
	if err := proto.Unmarshal(b, att); err != nil {
		t.Fatalf("unmarshal %s: %v", name, err)
	}
	return att
}

// recordedAK is the AK of a recorded attestation, trusted as if enrolled.
func recordedAK(t testing.TB, att *pb.Attestation) crypto.PublicKey {
	t.Helper()
	pub, err := tpm2.DecodePublic(att.GetAkPub())
	if err != nil {
		t.Fatal(err)
	}
	k, err := pub.Key()
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func mustPolicy(t testing.TB, pcrs map[int][][]byte) *attest.Policy {
	t.Helper()
	p := &attest.Policy{PCRs: pcrs}
	if err := p.Validate(); err != nil {
		t.Fatal(err)
	}
	return p
}

func boolp(b bool) *bool { return &b }

func ecdsaKey() (crypto.PublicKey, error) {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	return k.Public(), nil
}
