package luks2

import (
	"bytes"
	"crypto/sha1"
	"crypto/sha256"
	"crypto/sha512"
	"encoding/hex"
	"fmt"
	"hash"
	"math/rand/v2"
	"testing"

	"golang.org/x/crypto/pbkdf2"
)

// TestPBKDF2RFC6070 checks the PBKDF2-HMAC-SHA1 vectors of RFC 6070 (the
// 16 777 216-iteration one is left out: it takes seconds).
func TestPBKDF2RFC6070(t *testing.T) {
	for _, tc := range []struct {
		name, p, s string
		c          int
		dk         string
	}{
		{"c=1", "password", "salt", 1, "0c60c80f961f0e71f3a9b524af6012062fe037a6"},
		{"c=2", "password", "salt", 2, "ea6c014dc72d6f8ccd1ed92ace1d41f0d8de8957"},
		{"c=4096", "password", "salt", 4096, "4b007901b765489abead49d926f721d065a429c1"},
		{"long", "passwordPASSWORDpassword", "saltSALTsaltSALTsaltSALTsaltSALTsalt", 4096, "3d2eec4fe41c849b80c8d83662c0e44a8b291a964cf2f07038"},
		{"nul", "pass\x00word", "sa\x00lt", 4096, "56fa6aa75548099dcc37d7f03425e0c3"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			want, _ := hex.DecodeString(tc.dk)
			got, err := pbkdf2Locked([]byte(tc.p), []byte(tc.s), tc.c, len(want), sha1.New)
			if err != nil {
				t.Fatal(err)
			}
			defer got.Destroy()
			if !bytes.Equal(got.Bytes(), want) {
				t.Errorf("got %x, want %x", got.Bytes(), want)
			}
		})
	}
}

// TestPBKDF2MatchesXCrypto compares with golang.org/x/crypto/pbkdf2 over
// passwords shorter than, as long as and longer than the hash block,
// output lengths that end inside, at and past a hash-sized block, and
// several iteration counts.
func TestPBKDF2MatchesXCrypto(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	for _, h := range []struct {
		name string
		new  func() hash.Hash
	}{{"sha1", sha1.New}, {"sha256", sha256.New}, {"sha512", sha512.New}} {
		bs, size := h.new().BlockSize(), h.new().Size()
		for _, pl := range []int{0, 1, 32, bs - 1, bs, bs + 1, 2*bs + 7, 300} {
			for _, kl := range []int{1, size - 1, size, size + 1, 64, 3*size + 5} {
				iter := []int{1, 2, 3, 1000}[r.IntN(4)]
				sl := r.IntN(80)
				t.Run(fmt.Sprintf("%s/pass=%d/key=%d/iter=%d/salt=%d", h.name, pl, kl, iter, sl), func(t *testing.T) {
					pass, salt := make([]byte, pl), make([]byte, sl)
					for i := range pass {
						pass[i] = byte(r.Uint32())
					}
					for i := range salt {
						salt[i] = byte(r.Uint32())
					}
					want := pbkdf2.Key(pass, salt, iter, kl, h.new)
					got, err := pbkdf2Locked(pass, salt, iter, kl, h.new)
					if err != nil {
						t.Fatal(err)
					}
					defer got.Destroy()
					if !bytes.Equal(got.Bytes(), want) {
						t.Errorf("got %x\nwant %x", got.Bytes(), want)
					}
				})
			}
		}
	}
}

func TestPBKDF2Errors(t *testing.T) {
	if _, err := pbkdf2Locked([]byte("k"), nil, 0, 32, sha256.New); err == nil {
		t.Error("0 iterations: no error")
	}
	if _, err := pbkdf2Locked([]byte("k"), nil, 1, 0, sha256.New); err == nil {
		t.Error("0-byte key: no error")
	}
}

// BenchmarkPBKDF2Digest times the volume-key digest (pbkdf2-sha256 over a
// 64-byte key, 32-byte output, DigestIterations) against x/crypto.
func BenchmarkPBKDF2Digest(b *testing.B) {
	vk, salt := bytes.Repeat([]byte{7}, 64), bytes.Repeat([]byte{9}, 32)
	b.Run("keygate", func(b *testing.B) {
		for b.Loop() {
			out, err := pbkdf2Locked(vk, salt, DigestIterations, 32, sha256.New)
			if err != nil {
				b.Fatal(err)
			}
			out.Destroy()
		}
	})
	b.Run("x-crypto", func(b *testing.B) {
		for b.Loop() {
			pbkdf2.Key(vk, salt, DigestIterations, 32, sha256.New)
		}
	})
}
