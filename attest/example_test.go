package attest_test

import (
	"crypto"
	"encoding/json"
	"errors"
	"fmt"
	"log"
	"time"

	"github.com/google/go-tpm-tools/client"
	"github.com/google/go-tpm-tools/simulator"

	"github.com/keygate/keygate/attest"
)

// The key service issues a challenge bound to the VM, volume, EK and AK,
// and redeems it once when the VM comes back with its attestation.
func ExampleChallenger() {
	macKey := make([]byte, 32) // derived from the master key in keysvc
	ch, err := attest.NewChallenger(macKey, attest.WithReplayCache(attest.NewMemReplayCache(1024, nil)))
	if err != nil {
		log.Fatal(err)
	}
	ekPub, akPub := exampleKey(), exampleKey()

	nonce, token, err := ch.Issue("vm-1", "vol-1", ekPub, akPub)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("nonce bytes:", len(nonce))

	claims, err := ch.Redeem(token, "vm-1", "vol-1", ekPub, akPub, time.Now())
	fmt.Println("first use:", err, claims.VM, claims.Volume)

	_, err = ch.Redeem(token, "vm-1", "vol-1", ekPub, akPub, time.Now())
	fmt.Println("replay refused:", errors.Is(err, attest.ErrChallengeReplayed))

	_, err = ch.Check(token, "vm-1", "vol-1", ekPub, akPub, time.Now().Add(time.Hour))
	fmt.Println("expired:", errors.Is(err, attest.ErrChallengeExpired))
	// Output:
	// nonce bytes: 32
	// first use: <nil> vm-1 vol-1
	// replay refused: true
	// expired: true
}

// Verify checks a quote from the VM's TPM (here the simulator) against the
// challenge nonce, the enrolled AK and the policy; a denial names the PCRs.
func ExampleVerify() {
	sim, err := simulator.Get()
	if err != nil {
		log.Fatal(err)
	}
	defer sim.Close()
	ak, err := client.AttestationKeyECC(sim)
	if err != nil {
		log.Fatal(err)
	}
	defer ak.Close()

	nonce := []byte("nonce from the redeemed challenge")
	att, err := ak.Attest(client.AttestOpts{Nonce: nonce, TCGEventLog: []byte{}})
	if err != nil {
		log.Fatal(err)
	}

	policy, err := attest.ParsePolicy([]byte(`{"pcrs": {"0": ["0000000000000000000000000000000000000000000000000000000000000000"]}}`))
	if err != nil {
		log.Fatal(err)
	}
	opts := attest.VerifyOpts{Nonce: nonce, TrustedAKs: []crypto.PublicKey{ak.PublicKey()}, Policy: policy}
	res, err := attest.Verify(att, opts)
	fmt.Printf("verified: %v, PCR 0 = %x…\n", err == nil, res.PCRs[0][:4])

	opts.Policy, _ = attest.ParsePolicy([]byte(`{"pcrs": {"0": ["1111111111111111111111111111111111111111111111111111111111111111"]}}`))
	_, err = attest.Verify(att, opts)
	var d *attest.Denial
	if errors.As(err, &d) {
		body, _ := json.Marshal(d.Mismatches)
		fmt.Println("denied:", errors.Is(err, attest.ErrPolicyDenied), string(body))
	}
	// Output:
	// verified: true, PCR 0 = 00000000…
	// denied: true [{"pcr":0,"allowed":["1111111111111111111111111111111111111111111111111111111111111111"],"got":"0000000000000000000000000000000000000000000000000000000000000000"}]
}

func exampleKey() crypto.PublicKey {
	k, err := ecdsaKey()
	if err != nil {
		log.Fatal(err)
	}
	return k
}
