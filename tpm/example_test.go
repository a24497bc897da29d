//go:build cgo

package tpm_test

import (
	"crypto"
	"fmt"
	"log"

	"github.com/google/go-tpm-tools/server"

	"github.com/keygate/keygate/tpm"
)

// Open a TPM and print what enrollment needs: the EK public key as PEM.
// Use "/dev/tpmrm0" in a VM, or "swtpm:/path/to/server.sock".
func ExampleOpen() {
	tp, err := tpm.Open("sim")
	if err != nil {
		log.Fatal(err)
	}
	defer tp.Close()
	ek, err := tp.EK(tpm.ECC)
	if err != nil {
		log.Fatal(err)
	}
	pemBytes, err := ek.PEM()
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(string(pemBytes[:26]))
	// Output: -----BEGIN PUBLIC KEY-----
}

// The release path: keysvc seals an unwrap key to the VM's EK and current
// PCR values; only that TPM, in that state, imports it. Extending
// tpm.WindowPCR afterwards closes the window.
func ExampleTPM_Import() {
	tp, err := tpm.Open("sim")
	if err != nil {
		log.Fatal(err)
	}
	defer tp.Close()
	ek, _ := tp.EK(tpm.ECC)                 // enrolled at keysvc
	pcrs, _ := tp.PCRs(0, 7, tpm.WindowPCR) // the policy keysvc expects

	// On keysvc:
	blob, err := server.CreateImportBlob(ek.Key, []byte("32-byte unwrap key.............."), pcrs)
	if err != nil {
		log.Fatal(err)
	}

	// On the VM:
	uk, err := tp.Import(blob, tpm.ECC)
	if err != nil {
		log.Fatal(err)
	}
	defer uk.Destroy()
	fmt.Println(len(uk.Bytes()))

	if err := tp.Extend(tpm.WindowPCR, []byte("keygate: volume unlocked")); err != nil {
		log.Fatal(err)
	}
	_, err = tp.Import(blob, tpm.ECC)
	fmt.Println(err != nil)
	// Output:
	// 32
	// true
}

// Quote the PCRs with the AK over the verifier's nonce; the verifier checks
// it with server.VerifyAttestation and the enrolled AK.
func ExampleTPM_Attest() {
	tp, err := tpm.Open("sim")
	if err != nil {
		log.Fatal(err)
	}
	defer tp.Close()
	ak, err := tp.AK(tpm.ECC) // enrolled at keysvc
	if err != nil {
		log.Fatal(err)
	}
	nonce := []byte("nonce from the keysvc challenge")
	att, err := tp.Attest(nonce, tpm.ECC)
	if err != nil {
		log.Fatal(err)
	}

	// On keysvc (package attest does this, then compares the policy PCRs):
	_, err = server.VerifyAttestation(att, server.VerifyOpts{Nonce: nonce, TrustedAKs: []crypto.PublicKey{ak.Key}})
	fmt.Println(err)
	// Output: <nil>
}
