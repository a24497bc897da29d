package xts

import (
	"bytes"
	"testing"
)

// FuzzXTS checks every implementation against golang.org/x/crypto/xts for
// arbitrary keys, tweaks and data units (trimmed to whole blocks), in place
// and out of place, and that decryption inverts encryption.
func FuzzXTS(f *testing.F) {
	f.Add(make([]byte, 64), uint64(0), make([]byte, 512))
	f.Add(bytes.Repeat([]byte{0xa5}, 32), uint64(1<<64-1), make([]byte, 4096+48))
	f.Add(bytes.Repeat([]byte{1, 2, 3}, 22), uint64(7), []byte("sixteen byte blk"))
	f.Fuzz(func(t *testing.T, keySeed []byte, tweak uint64, data []byte) {
		key := make([]byte, 32+32*(len(keySeed)&1))
		copy(key, keySeed)
		data = data[:len(data)&^(BlockSize-1)]
		if len(data) == 0 {
			return
		}
		ref := reference(t, key)
		want := make([]byte, len(data))
		ref.Encrypt(want, data, tweak)
		for _, im := range availableImpls() {
			c := newTestCipher(t, key, im)
			got := make([]byte, len(data))
			c.Encrypt(got, data, tweak)
			if !bytes.Equal(got, want) {
				t.Fatalf("%v: encrypt differs from x/crypto/xts", im)
			}
			c.Decrypt(got, got, tweak)
			if !bytes.Equal(got, data) {
				t.Fatalf("%v: in-place decrypt does not invert encrypt", im)
			}
			c.Close()
		}
	})
}
