package importblob_test

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"errors"
	"testing"

	tpmpb "github.com/google/go-tpm-tools/proto/tpm"
	"github.com/google/go-tpm-tools/server"
	"github.com/google/go-tpm/legacy/tpm2"

	"github.com/keygate/keygate/internal/tpmtest"
	"github.com/keygate/keygate/tpm"
	"github.com/keygate/keygate/tpm/importblob"
)

// TestImportedByARealTPM makes blobs for the simulator's EKs and has the
// TPM import them: the TPM is the judge of the format, the duplication
// keys and the PCR policy.
func TestImportedByARealTPM(t *testing.T) {
	tp := tpmtest.Open(t, "sim")
	current, err := tp.PCRs(0, 7, tpm.WindowPCR)
	if err != nil {
		t.Fatal(err)
	}
	other := &tpmpb.PCRs{Hash: current.Hash, Pcrs: map[uint32][]byte{}}
	for i, v := range current.Pcrs {
		other.Pcrs[i] = bytes.Clone(v)
	}
	other.Pcrs[7][0] ^= 1

	for _, tc := range []struct {
		name    string
		alg     tpm.Alg
		pcrs    *tpmpb.PCRs
		secret  int
		wantErr error
	}{
		{"ecc, no PCRs", tpm.ECC, nil, 32, nil},
		{"ecc, current PCRs", tpm.ECC, current, 32, nil},
		{"ecc, other PCRs", tpm.ECC, other, 32, tpm.ErrPCRMismatch},
		{"ecc, longest secret", tpm.ECC, current, importblob.MaxSecret, nil},
		{"ecc, one byte", tpm.ECC, nil, 1, nil},
		{"rsa, no PCRs", tpm.RSA, nil, 32, nil},
		{"rsa, current PCRs", tpm.RSA, current, 32, nil},
		{"rsa, other PCRs", tpm.RSA, other, 32, tpm.ErrPCRMismatch},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ek, err := tp.EK(tc.alg)
			if err != nil {
				t.Fatal(err)
			}
			secret := make([]byte, tc.secret)
			rand.Read(secret)
			blob, err := importblob.New(ek.Key, secret, tc.pcrs)
			if err != nil {
				t.Fatal(err)
			}
			got, err := tp.Import(blob, tc.alg)
			if tc.wantErr != nil {
				if !errors.Is(err, tc.wantErr) {
					t.Fatalf("import: %v, want %v", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("import: %v", err)
			}
			defer got.Destroy()
			if !bytes.Equal(got.Bytes(), secret) {
				t.Fatal("the TPM imported a different secret")
			}
		})
	}

	t.Run("another EK", func(t *testing.T) {
		ek, err := tp.EK(tpm.ECC)
		if err != nil {
			t.Fatal(err)
		}
		blob, err := importblob.New(ek.Key, make([]byte, 32), nil)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := tp.Import(blob, tpm.RSA); !errors.Is(err, tpm.ErrWrongTPM) {
			t.Fatalf("import with the RSA EK of a blob for the ECC EK: %v, want ErrWrongTPM", err)
		}
	})
}

// TestSamePublicAreaAsGoTPMTools compares the parts of the public area
// that do not depend on randomness with go-tpm-tools' CreateImportBlob,
// which the VM side's client was written against.
func TestSamePublicAreaAsGoTPMTools(t *testing.T) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	pcrs := &tpmpb.PCRs{Hash: tpmpb.HashAlgo_SHA256, Pcrs: map[uint32][]byte{
		0: bytes.Repeat([]byte{1}, 32), 7: bytes.Repeat([]byte{7}, 32), 15: make([]byte, 32), 23: bytes.Repeat([]byte{0xff}, 32)}}
	for _, p := range []*tpmpb.PCRs{nil, pcrs} {
		ours, err := importblob.New(key.Public(), make([]byte, 32), p)
		if err != nil {
			t.Fatal(err)
		}
		theirs, err := server.CreateImportBlob(key.Public(), make([]byte, 32), p)
		if err != nil {
			t.Fatal(err)
		}
		a, err := tpm2.DecodePublic(ours.PublicArea)
		if err != nil {
			t.Fatal(err)
		}
		b, err := tpm2.DecodePublic(theirs.PublicArea)
		if err != nil {
			t.Fatal(err)
		}
		if a.Type != b.Type || a.NameAlg != b.NameAlg || a.Attributes != b.Attributes || !bytes.Equal(a.AuthPolicy, b.AuthPolicy) ||
			a.KeyedHashParameters.Alg != b.KeyedHashParameters.Alg {
			t.Errorf("pcrs %v: public area differs:\n ours   %+v\n theirs %+v", p.GetPcrs() != nil, a, b)
		}
		if len(ours.EncryptedSeed) != len(theirs.EncryptedSeed) || len(ours.Duplicate) != len(theirs.Duplicate) {
			t.Errorf("pcrs %v: seed %d/%d bytes, duplicate %d/%d bytes", p.GetPcrs() != nil,
				len(ours.EncryptedSeed), len(theirs.EncryptedSeed), len(ours.Duplicate), len(theirs.Duplicate))
		}
	}
}

func TestBadInput(t *testing.T) {
	ecKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	p384, _ := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	edPub, _, _ := ed25519.GenerateKey(rand.Reader)
	sha256PCR := func(i uint32, n int) *tpmpb.PCRs {
		return &tpmpb.PCRs{Hash: tpmpb.HashAlgo_SHA256, Pcrs: map[uint32][]byte{i: make([]byte, n)}}
	}
	for _, tc := range []struct {
		name   string
		ek     crypto.PublicKey
		secret int
		pcrs   *tpmpb.PCRs
		want   error
	}{
		{"no EK", nil, 32, nil, importblob.ErrEK},
		{"ed25519 EK", edPub, 32, nil, importblob.ErrEK},
		{"P-384 EK", p384.Public(), 32, nil, importblob.ErrEK},
		{"empty secret", ecKey.Public(), 0, nil, importblob.ErrSecretSize},
		{"secret too long", ecKey.Public(), importblob.MaxSecret + 1, nil, importblob.ErrSecretSize},
		{"PCR 24", ecKey.Public(), 32, sha256PCR(24, 32), importblob.ErrPCRs},
		{"short PCR value", ecKey.Public(), 32, sha256PCR(7, 20), importblob.ErrPCRs},
		{"unknown bank", ecKey.Public(), 32, &tpmpb.PCRs{Hash: 0x77, Pcrs: map[uint32][]byte{7: make([]byte, 32)}}, importblob.ErrPCRs},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := importblob.New(tc.ek, make([]byte, tc.secret), tc.pcrs)
			if !errors.Is(err, tc.want) {
				t.Fatalf("got %v, want %v", err, tc.want)
			}
		})
	}
}
