package attest_test

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"testing"

	"github.com/keygate/keygate/attest"
)

// TestKeyFingerprint checks that the ECDSA fast path hashes exactly the
// PKIX encoding, for every curve it covers and for keys it leaves to x509.
func TestKeyFingerprint(t *testing.T) {
	ec := func(c elliptic.Curve) crypto.PublicKey {
		k, err := ecdsa.GenerateKey(c, rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		return &k.PublicKey
	}
	rsaKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	edKey, _, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		key  func() crypto.PublicKey
	}{
		{"P-256", func() crypto.PublicKey { return ec(elliptic.P256()) }},
		{"P-384", func() crypto.PublicKey { return ec(elliptic.P384()) }},
		{"P-521", func() crypto.PublicKey { return ec(elliptic.P521()) }},
		{"RSA-2048", func() crypto.PublicKey { return &rsaKey.PublicKey }},
		{"Ed25519", func() crypto.PublicKey { return edKey }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for range 8 {
				k := tc.key()
				der, err := x509.MarshalPKIXPublicKey(k)
				if err != nil {
					t.Fatal(err)
				}
				got, err := attest.KeyFingerprint(k)
				if err != nil {
					t.Fatal(err)
				}
				if want := sha256.Sum256(der); got != want {
					t.Fatalf("fingerprint %x, want SHA-256 of the PKIX encoding %x", got, want)
				}
			}
		})
	}
	t.Run("refused", func(t *testing.T) {
		for _, k := range []crypto.PublicKey{nil, (*ecdsa.PublicKey)(nil), "not a key"} {
			if _, err := attest.KeyFingerprint(k); err == nil {
				t.Errorf("KeyFingerprint(%#v): no error", k)
			}
		}
	})
}
