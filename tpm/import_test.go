package tpm_test

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"errors"
	"strings"
	"testing"

	tpmpb "github.com/google/go-tpm-tools/proto/tpm"
	"github.com/google/go-tpm-tools/server"
	"google.golang.org/protobuf/proto"

	"github.com/keygate/keygate/tpm"
)

// TestImport is the release path end to end: keysvc seals a secret to the
// EK (and PCRs) with server.CreateImportBlob, the VM's TPM imports it.
func TestImport(t *testing.T) {
	onEachTPM(t, func(t *testing.T, tp *tpm.TPM) {
		for _, alg := range []tpm.Alg{tpm.ECC, tpm.RSA} {
			t.Run(alg.String(), func(t *testing.T) {
				ek, err := tp.EK(alg)
				if err != nil {
					t.Fatal(err)
				}
				pcrs, err := tp.PCRs(0, 7, tpm.WindowPCR)
				if err != nil {
					t.Fatal(err)
				}
				for _, tc := range []struct {
					name string
					pcrs *tpmpb.PCRs
				}{{"unbound", nil}, {"pcr-bound", pcrs}} {
					t.Run(tc.name, func(t *testing.T) {
						secret := []byte("0123456789abcdef0123456789abcdef")
						blob := createBlob(t, ek.Key, secret, tc.pcrs)
						buf, err := tp.Import(blob, alg)
						if err != nil {
							t.Fatal(err)
						}
						defer buf.Destroy()
						if !bytes.Equal(buf.Bytes(), secret) {
							t.Fatalf("Import = %x, want %x", buf.Bytes(), secret)
						}
					})
				}
			})
		}
	})
}

// createBlob is what keysvc does; it also round-trips the blob through its
// wire encoding, as it crosses the network.
func createBlob(t *testing.T, ek crypto.PublicKey, secret []byte, pcrs *tpmpb.PCRs) *tpmpb.ImportBlob {
	t.Helper()
	blob, err := server.CreateImportBlob(ek, secret, pcrs)
	if err != nil {
		t.Fatalf("CreateImportBlob: %v", err)
	}
	wire, err := proto.Marshal(blob)
	if err != nil {
		t.Fatal(err)
	}
	var back tpmpb.ImportBlob
	if err := proto.Unmarshal(wire, &back); err != nil {
		t.Fatal(err)
	}
	return &back
}

func TestImportFailures(t *testing.T) {
	otherECC, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	otherRSA, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	onEachTPM(t, func(t *testing.T, tp *tpm.TPM) {
		ekECC, err := tp.EK(tpm.ECC)
		if err != nil {
			t.Fatal(err)
		}
		pcrs, err := tp.PCRs(tpm.WindowPCR)
		if err != nil {
			t.Fatal(err)
		}
		wrongPCRs := &tpmpb.PCRs{Hash: pcrs.Hash, Pcrs: map[uint32][]byte{uint32(tpm.WindowPCR): bytes.Repeat([]byte{0xAA}, 32)}}
		secret := []byte("a secret that must not come out")

		for _, tc := range []struct {
			name    string
			blob    *tpmpb.ImportBlob
			alg     tpm.Alg
			wantIs  error
			wantMsg string
		}{
			{"other TPM's ECC EK", createBlob(t, &otherECC.PublicKey, secret, nil), tpm.ECC, tpm.ErrWrongTPM, "another EK"},
			{"other TPM's RSA EK", createBlob(t, &otherRSA.PublicKey, secret, nil), tpm.RSA, tpm.ErrWrongTPM, "another EK"},
			{"ECC blob imported with RSA EK", createBlob(t, ekECC.Key, secret, nil), tpm.RSA, tpm.ErrWrongTPM, "--rsa"},
			{"wrong PCR values", createBlob(t, ekECC.Key, secret, wrongPCRs), tpm.ECC, tpm.ErrPCRMismatch, "PCRs [15]"},
			{"empty blob", &tpmpb.ImportBlob{}, tpm.ECC, nil, "empty or incomplete"},
			{"nil blob", nil, tpm.ECC, nil, "empty or incomplete"},
		} {
			t.Run(tc.name, func(t *testing.T) {
				buf, err := tp.Import(tc.blob, tc.alg)
				if err == nil {
					buf.Destroy()
					t.Fatal("Import succeeded, want an error")
				}
				if tc.wantIs != nil && !errors.Is(err, tc.wantIs) {
					t.Errorf("error %v, want errors.Is %v", err, tc.wantIs)
				}
				if !strings.Contains(err.Error(), tc.wantMsg) {
					t.Errorf("error %q does not mention %q", err, tc.wantMsg)
				}
			})
		}
	})
}

// TestCloseTheWindow: a blob bound to WindowPCR's value at unlock imports
// once; after the post-unlock extend, the same blob no longer imports.
func TestCloseTheWindow(t *testing.T) {
	onEachTPM(t, func(t *testing.T, tp *tpm.TPM) {
		mayExtend(t, tp)
		ek, err := tp.EK(tpm.ECC)
		if err != nil {
			t.Fatal(err)
		}
		pcrs, err := tp.PCRs(0, 7, tpm.WindowPCR)
		if err != nil {
			t.Fatal(err)
		}
		blob := createBlob(t, ek.Key, []byte("unwrap key"), pcrs)
		buf, err := tp.Import(blob, tpm.ECC)
		if err != nil {
			t.Fatalf("first Import: %v", err)
		}
		buf.Destroy()
		if err := tp.Extend(tpm.WindowPCR, []byte("keygate unlocked")); err != nil {
			t.Fatal(err)
		}
		buf, err = tp.Import(blob, tpm.ECC)
		if err == nil {
			buf.Destroy()
			t.Fatal("Import after closing the window succeeded")
		}
		if !errors.Is(err, tpm.ErrPCRMismatch) {
			t.Fatalf("Import after extend: %v, want ErrPCRMismatch", err)
		}
	})
}

func TestAttest(t *testing.T) {
	onEachTPM(t, func(t *testing.T, tp *tpm.TPM) {
		for _, alg := range []tpm.Alg{tpm.ECC, tpm.RSA} {
			t.Run(alg.String(), func(t *testing.T) {
				ak, err := tp.AK(alg)
				if err != nil {
					t.Fatal(err)
				}
				nonce := []byte("keysvc challenge nonce 0123456789")
				att, err := tp.Attest(nonce, alg)
				if err != nil {
					t.Fatal(err)
				}
				if tp.Kind() != tpm.Device && len(att.GetEventLog()) != 0 {
					t.Errorf("%v attestation carries a %d-byte event log, want none", tp.Kind(), len(att.GetEventLog()))
				}
				ms, err := server.VerifyAttestation(att, server.VerifyOpts{Nonce: nonce, TrustedAKs: []crypto.PublicKey{ak.Key}})
				if err != nil {
					t.Fatalf("VerifyAttestation: %v", err)
				}
				if ms == nil {
					t.Fatal("VerifyAttestation returned no machine state")
				}
				// The same attestation must not verify for another nonce
				// or another AK.
				if _, err := server.VerifyAttestation(att, server.VerifyOpts{Nonce: []byte("another nonce"), TrustedAKs: []crypto.PublicKey{ak.Key}}); err == nil {
					t.Error("attestation verified with the wrong nonce")
				}
				other, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
				if _, err := server.VerifyAttestation(att, server.VerifyOpts{Nonce: nonce, TrustedAKs: []crypto.PublicKey{&other.PublicKey}}); err == nil {
					t.Error("attestation verified with an untrusted AK")
				}
			})
		}
		if _, err := tp.Attest(nil, tpm.ECC); err == nil || !strings.Contains(err.Error(), "nonce") {
			t.Errorf("Attest(nil) = %v, want an empty-nonce error", err)
		}
	})
}

// TestImportOtherTPM: a blob made for one real TPM's EK (a swtpm) does not
// import on another (the simulator).
func TestImportOtherTPM(t *testing.T) {
	other := openChecked(t, "swtpm:"+startSwtpm(t))
	here := openChecked(t, "sim")
	for _, alg := range []tpm.Alg{tpm.ECC, tpm.RSA} {
		t.Run(alg.String(), func(t *testing.T) {
			ek, err := other.EK(alg)
			if err != nil {
				t.Fatal(err)
			}
			blob := createBlob(t, ek.Key, []byte("for the other VM"), nil)
			buf, err := here.Import(blob, alg)
			if err == nil {
				buf.Destroy()
				t.Fatal("blob for another TPM imported")
			}
			if !errors.Is(err, tpm.ErrWrongTPM) {
				t.Fatalf("Import: %v, want ErrWrongTPM", err)
			}
			// And it does import where it belongs.
			buf, err = other.Import(blob, alg)
			if err != nil {
				t.Fatal(err)
			}
			buf.Destroy()
		})
	}
}
