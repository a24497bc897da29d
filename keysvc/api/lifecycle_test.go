package api_test

import (
	"bytes"
	"crypto/hmac"
	"crypto/sha256"
	"testing"

	"github.com/keygate/keygate/keysvc/api"
)

// TestRotateProofIsHMAC: the spelled-out HMAC is crypto/hmac's, for keys
// shorter than, as long as, and longer than a block.
func TestRotateProofIsHMAC(t *testing.T) {
	for _, n := range []int{1, 32, 64, 65, 200} {
		key := bytes.Repeat([]byte{byte(n)}, n)
		m := hmac.New(sha256.New, key)
		m.Write([]byte("keygate rotate confirm v1\x00s1.session"))
		if got, want := api.RotateProof(key, "s1.session"), m.Sum(nil); !bytes.Equal(got, want) {
			t.Errorf("%d-byte key: %x, want %x", n, got, want)
		}
	}
	if bytes.Equal(api.RotateProof([]byte("k"), "a"), api.RotateProof([]byte("k"), "b")) {
		t.Error("the proof does not depend on the session")
	}
}
