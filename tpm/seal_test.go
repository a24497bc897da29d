package tpm_test

import (
	"bytes"
	"errors"
	"testing"

	"github.com/keygate/keygate/tpm"
)

// TestSealRoundTrip: a secret sealed by a TPM unseals on it, byte for byte,
// with nothing left loaded (openChecked's Cleanup checks the handles).
func TestSealRoundTrip(t *testing.T) {
	onEachTPM(t, func(t *testing.T, tp *tpm.TPM) {
		secret := bytes.Repeat([]byte{0x5a}, 32)
		blob, err := tp.Seal(secret)
		if err != nil {
			t.Fatalf("Seal: %v", err)
		}
		if bytes.Contains(blob, secret) {
			t.Fatal("sealed blob holds the secret in the clear")
		}
		got, err := tp.Unseal(blob)
		if err != nil {
			t.Fatalf("Unseal: %v", err)
		}
		defer got.Destroy()
		if !bytes.Equal(got.Bytes(), secret) {
			t.Fatal("unsealed secret differs")
		}
	})
}

// TestUnsealRefuses: blobs that are not this TPM's are refused, and one from
// another TPM says so with ErrSealedElsewhere.
func TestUnsealRefuses(t *testing.T) {
	a := openChecked(t, "swtpm:"+startSwtpm(t))
	b := openChecked(t, "swtpm:"+startSwtpm(t))
	blob, err := a.Seal([]byte("master key stand-in"))
	if err != nil {
		t.Fatal(err)
	}
	flipped := bytes.Clone(blob)
	flipped[len(flipped)-3] ^= 1
	for _, tc := range []struct {
		name      string
		tp        *tpm.TPM
		blob      []byte
		elsewhere bool
	}{
		{"other TPM", b, blob, true},
		{"garbage", a, []byte("not a blob"), false},
		{"empty", a, nil, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := tc.tp.Unseal(tc.blob)
			if err == nil {
				got.Destroy()
				t.Fatal("Unseal succeeded")
			}
			if errors.Is(err, tpm.ErrSealedElsewhere) != tc.elsewhere {
				t.Fatalf("Unseal: %v; want ErrSealedElsewhere: %v", err, tc.elsewhere)
			}
		})
	}
	if _, err := a.Seal(nil); err == nil {
		t.Fatal("Seal of an empty secret succeeded")
	}
}
