package xts

import (
	"crypto/aes"
	"testing"

	xxts "golang.org/x/crypto/xts"
)

var benchSizes = []struct {
	name string
	size int
	dec  bool
}{
	{"encrypt-4096", 4096, false},
	{"decrypt-4096", 4096, true},
	{"encrypt-512", 512, false},
	{"decrypt-512", 512, true},
}

// BenchmarkXTS measures one sector per op on one core, with the
// implementation New picks (AES-256-XTS, as LUKS2 uses).
func BenchmarkXTS(b *testing.B) {
	benchImpl(b, bestImpl())
}

// BenchmarkXTSImpl runs the same measurement for every implementation the
// CPU supports.
func BenchmarkXTSImpl(b *testing.B) {
	for _, im := range availableImpls() {
		b.Run(im.String(), func(b *testing.B) { benchImpl(b, im) })
	}
}

func benchImpl(b *testing.B, im impl) {
	c := newTestCipher(b, make([]byte, 64), im)
	for _, bs := range benchSizes {
		b.Run(bs.name, func(b *testing.B) {
			buf := make([]byte, bs.size)
			b.SetBytes(int64(bs.size))
			var tw uint64
			for b.Loop() {
				if bs.dec {
					c.Decrypt(buf, buf, tw)
				} else {
					c.Encrypt(buf, buf, tw)
				}
				tw++
			}
		})
	}
}

// BenchmarkXCryptoXTS is the in-run reference: golang.org/x/crypto/xts over
// crypto/aes, one sector per op.
func BenchmarkXCryptoXTS(b *testing.B) {
	c, err := xxts.NewCipher(aes.NewCipher, make([]byte, 64))
	if err != nil {
		b.Fatal(err)
	}
	for _, bs := range benchSizes {
		b.Run(bs.name, func(b *testing.B) {
			buf := make([]byte, bs.size)
			b.SetBytes(int64(bs.size))
			var tw uint64
			for b.Loop() {
				if bs.dec {
					c.Decrypt(buf, buf, tw)
				} else {
					c.Encrypt(buf, buf, tw)
				}
				tw++
			}
		})
	}
}

// BenchmarkXTSSectors measures the batch API on 4096-byte sectors, in place,
// with batches at and above parallelMin, which it spreads over GOMAXPROCS
// goroutines (compare -cpu 1,2). A 1 MiB batch no longer fits in one core's
// L2 cache, so there it measures the memory system as much as the cipher.
func BenchmarkXTSSectors(b *testing.B) {
	c := newTestCipher(b, make([]byte, 64), bestImpl())
	for _, size := range []struct {
		name string
		n    int
	}{{"256KiB", 256 << 10}, {"1MiB", 1 << 20}} {
		for _, dir := range []string{"encrypt", "decrypt"} {
			b.Run(dir+"-"+size.name, func(b *testing.B) {
				buf := make([]byte, size.n)
				b.SetBytes(int64(len(buf)))
				var tw uint64
				for b.Loop() {
					if dir == "decrypt" {
						c.DecryptSectors(buf, buf, 4096, tw, 8)
					} else {
						c.EncryptSectors(buf, buf, 4096, tw, 8)
					}
					tw += uint64(8 * len(buf) / 4096)
				}
			})
		}
	}
}
