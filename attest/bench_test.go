package attest_test

import (
	"crypto"
	"testing"
	"time"

	"github.com/keygate/keygate/attest"
)

// BenchmarkVerify measures the verifier's CPU cost per unlock, on a
// simulator attestation (3 banks quoted, no event log).
func BenchmarkVerify(b *testing.B) {
	att := recorded(b, simAttestation)
	opts := attest.VerifyOpts{Nonce: fuzzNonce, TrustedAKs: []crypto.PublicKey{recordedAK(b, att)}}
	p, _, err := attest.Learn(att, opts, attest.BootPCRs)
	if err != nil {
		b.Fatal(err)
	}
	opts.Policy = p
	b.ReportAllocs()
	for b.Loop() {
		if _, err := attest.Verify(att, opts); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkRedeem measures Issue plus Redeem of one challenge.
func BenchmarkRedeem(b *testing.B) {
	ch, err := attest.NewChallenger(testKey, attest.WithReplayCache(attest.NewMemReplayCache(1<<20, nil)))
	if err != nil {
		b.Fatal(err)
	}
	ek, ak := randomKey(b), randomKey(b)
	b.ReportAllocs()
	for b.Loop() {
		_, tok, err := ch.Issue("vm", "vol", ek, ak)
		if err != nil {
			b.Fatal(err)
		}
		if _, err := ch.Redeem(tok, "vm", "vol", ek, ak, time.Now()); err != nil {
			b.Fatal(err)
		}
	}
}
