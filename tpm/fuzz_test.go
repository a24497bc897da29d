package tpm_test

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"sync"
	"testing"

	"github.com/keygate/keygate/tpm"
)

// FuzzParsePublicKeyPEM: enrollment parses EK/AK PEM from outside; it must
// never panic, and whatever it accepts must re-encode and parse the same.
func FuzzParsePublicKeyPEM(f *testing.F) {
	k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	good, _ := tpm.MarshalPublicKeyPEM(&k.PublicKey)
	f.Add(good)
	f.Add([]byte("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"))
	f.Add([]byte("-----BEGIN PUBLIC KEY-----\n\n-----END PUBLIC KEY-----\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		pub, err := tpm.ParsePublicKeyPEM(data)
		if err != nil {
			return
		}
		again, err := tpm.MarshalPublicKeyPEM(pub)
		if err != nil {
			t.Fatalf("accepted key does not re-encode: %v", err)
		}
		if _, err := tpm.ParsePublicKeyPEM(again); err != nil {
			t.Fatalf("re-encoded key does not parse: %v", err)
		}
	})
}

// TestConcurrentUse: methods serialize on one connection, so concurrent
// callers on a swtpm socket get whole, matching responses.
func TestConcurrentUse(t *testing.T) {
	onEachTPM(t, func(t *testing.T, tp *tpm.TPM) {
		want, err := tp.EK(tpm.ECC)
		if err != nil {
			t.Fatal(err)
		}
		var wg sync.WaitGroup
		for i := range 4 {
			wg.Go(func() {
				for range 3 {
					if i%2 == 0 {
						ek, err := tp.EK(tpm.ECC)
						if err != nil {
							t.Error(err)
							return
						}
						if !ek.Key.(*ecdsa.PublicKey).Equal(want.Key) {
							t.Error("EK changed under concurrent use")
						}
					} else if _, err := tp.PCRs(0, 7); err != nil {
						t.Error(err)
						return
					}
				}
			})
		}
		wg.Wait()
	})
}
