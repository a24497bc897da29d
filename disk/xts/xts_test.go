package xts

import (
	"bufio"
	"bytes"
	"crypto/aes"
	"encoding/hex"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/keygate/keygate/internal/testutil"
	xxts "golang.org/x/crypto/xts"
)

// forEachImpl runs f once per implementation this CPU supports, so every
// code path is exercised on the machine that runs the tests.
func forEachImpl(t *testing.T, f func(t *testing.T, im impl)) {
	t.Helper()
	for _, im := range availableImpls() {
		t.Run(im.String(), func(t *testing.T) { f(t, im) })
	}
}

func newTestCipher(t testing.TB, key []byte, im impl) *Cipher {
	t.Helper()
	c, err := newWithImpl(key, im)
	if err != nil {
		t.Fatalf("new cipher: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

type vector struct {
	name    string
	key, pt []byte
	ct      []byte
	dus     uint64
}

// readVectors parses the "field: value" records of a testdata file; see the
// header of testdata/ieee1619.txt.
func readVectors(t *testing.T, path string) []vector {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var vs []vector
	var v *vector
	sc := bufio.NewScanner(f)
	sc.Buffer(nil, 1<<20)
	for line := 1; sc.Scan(); line++ {
		s := sc.Text()
		if s == "" || strings.HasPrefix(s, "#") {
			continue
		}
		field, val, ok := strings.Cut(s, ": ")
		if !ok {
			t.Fatalf("%s:%d: want \"field: value\"", path, line)
		}
		var err error
		switch field {
		case "vector":
			vs = append(vs, vector{name: "vector-" + val})
			v = &vs[len(vs)-1]
		case "key":
			v.key, err = hex.DecodeString(val)
		case "dus":
			v.dus, err = strconv.ParseUint(val, 0, 64)
		case "pt":
			v.pt, err = hex.DecodeString(val)
		case "ct":
			v.ct, err = hex.DecodeString(val)
		default:
			err = fmt.Errorf("unknown field %q", field)
		}
		if err != nil {
			t.Fatalf("%s:%d: %v", path, line, err)
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return vs
}

func TestIEEE1619Vectors(t *testing.T) {
	var vs []vector
	for _, p := range testutil.Glob(t, "testdata/*.txt") {
		vs = append(vs, readVectors(t, p)...)
	}
	var n128, n256 int
	for _, v := range vs {
		if len(v.key) == 32 {
			n128++
		} else {
			n256++
		}
	}
	if n128 == 0 || n256 == 0 {
		t.Fatalf("want vectors for both key sizes, have %d AES-128 and %d AES-256", n128, n256)
	}
	forEachImpl(t, func(t *testing.T, im impl) {
		for _, v := range vs {
			t.Run(v.name, func(t *testing.T) {
				c := newTestCipher(t, v.key, im)
				got := make([]byte, len(v.pt))
				c.Encrypt(got, v.pt, v.dus)
				if !bytes.Equal(got, v.ct) {
					t.Errorf("encrypt:\n got %x\nwant %x", got, v.ct)
				}
				c.Decrypt(got, v.ct, v.dus)
				if !bytes.Equal(got, v.pt) {
					t.Errorf("decrypt:\n got %x\nwant %x", got, v.pt)
				}
			})
		}
	})
}

func reference(t testing.TB, key []byte) *xxts.Cipher {
	t.Helper()
	r, err := xxts.NewCipher(aes.NewCipher, key)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func randBytes(r *rand.ChaCha8, n int) []byte {
	b := make([]byte, n)
	r.Read(b)
	return b
}

func TestRandomVsXCrypto(t *testing.T) {
	lengths := []int{16, 32, 48, 64, 80, 112, 128, 144, 240, 256, 496, 512, 528, 1024, 4080, 4096, 4112, 65536}
	tweaks := []uint64{0, 1, 0x3333333333, 1<<63 - 1, 1 << 63, 1<<64 - 2, 1<<64 - 1}
	forEachImpl(t, func(t *testing.T, im impl) {
		for _, keyLen := range []int{32, 64} {
			t.Run(fmt.Sprintf("key%d", keyLen), func(t *testing.T) {
				r := rand.NewChaCha8([32]byte{byte(keyLen), byte(im)})
				key := randBytes(r, keyLen)
				c, ref := newTestCipher(t, key, im), reference(t, key)
				for _, n := range lengths {
					for _, tw := range append(tweaks, r.Uint64()) {
						pt := randBytes(r, n)
						want := make([]byte, n)
						ref.Encrypt(want, pt, tw)
						got := make([]byte, n)
						c.Encrypt(got, pt, tw)
						if !bytes.Equal(got, want) {
							t.Fatalf("encrypt len %d tweak %#x: differs from x/crypto/xts", n, tw)
						}
						inPlace := bytes.Clone(pt)
						c.Encrypt(inPlace, inPlace, tw)
						if !bytes.Equal(inPlace, want) {
							t.Fatalf("in-place encrypt len %d tweak %#x: differs from x/crypto/xts", n, tw)
						}
						c.Decrypt(got, want, tw)
						if !bytes.Equal(got, pt) {
							t.Fatalf("decrypt len %d tweak %#x: differs from plaintext", n, tw)
						}
						c.Decrypt(inPlace, inPlace, tw)
						if !bytes.Equal(inPlace, pt) {
							t.Fatalf("in-place decrypt len %d tweak %#x: differs from plaintext", n, tw)
						}
					}
				}
			})
		}
	})
}

func TestSectors(t *testing.T) {
	cases := []struct {
		name       string
		keyLen     int
		sectorSize int
		sectors    int
		first      uint64
		step       uint64
	}{
		{"aes256-512-step1", 64, 512, 7, 100, 1},
		{"aes256-4096-step8", 64, 4096, 5, 800, 8},
		{"aes128-512-step1", 32, 512, 9, 0, 1},
		{"aes128-4096-step8", 32, 4096, 3, 8, 8},
		{"wraps-2^64", 64, 512, 8, 1<<64 - 3, 1},
		{"multicore-512-step1", 64, 512, 2048 + 3, 12345, 1},          // 1 MiB + 3 sectors
		{"multicore-4096-step8", 64, 4096, 64*4 + 1, 1<<40 + 8, 8},    // 1 MiB + 1 sector
		{"multicore-aes128-4096", 32, 4096, parallelMin / 4096, 0, 8}, // exactly the threshold
	}
	// Make sure the multi-core split runs, and splits unevenly (3 workers),
	// even on a machine with fewer CPUs or under -cpu 1.
	defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(3))
	defer func(n int) { numCPU = n }(numCPU)
	numCPU = 3
	forEachImpl(t, func(t *testing.T, im impl) {
		for _, tc := range cases {
			t.Run(tc.name, func(t *testing.T) {
				r := rand.NewChaCha8([32]byte{byte(tc.sectors), byte(tc.keyLen)})
				key := randBytes(r, tc.keyLen)
				c, ref := newTestCipher(t, key, im), reference(t, key)
				pt := randBytes(r, tc.sectors*tc.sectorSize)
				want := make([]byte, len(pt))
				for i := range tc.sectors {
					o := i * tc.sectorSize
					ref.Encrypt(want[o:o+tc.sectorSize], pt[o:o+tc.sectorSize], tc.first+uint64(i)*tc.step)
				}
				got := make([]byte, len(pt))
				c.EncryptSectors(got, pt, tc.sectorSize, tc.first, tc.step)
				if !bytes.Equal(got, want) {
					t.Fatal("EncryptSectors differs from x/crypto/xts sector by sector")
				}
				buf := bytes.Clone(pt)
				c.EncryptSectors(buf, buf, tc.sectorSize, tc.first, tc.step)
				if !bytes.Equal(buf, want) {
					t.Fatal("in-place EncryptSectors differs from x/crypto/xts")
				}
				c.DecryptSectors(buf, buf, tc.sectorSize, tc.first, tc.step)
				if !bytes.Equal(buf, pt) {
					t.Fatal("in-place DecryptSectors does not invert EncryptSectors")
				}
				c.DecryptSectors(got, want, tc.sectorSize, tc.first, tc.step)
				if !bytes.Equal(got, pt) {
					t.Fatal("DecryptSectors does not invert EncryptSectors")
				}
			})
		}
	})
}

func TestNewBadKeySize(t *testing.T) {
	for _, n := range []int{0, 1, 16, 24, 31, 33, 48, 63, 65, 128} {
		t.Run(strconv.Itoa(n), func(t *testing.T) {
			c, err := New(make([]byte, n))
			if !errors.Is(err, ErrKeySize) || c != nil {
				t.Fatalf("New(%d-byte key) = %v, %v; want nil, ErrKeySize", n, c, err)
			}
		})
	}
}

func TestCloseIdempotent(t *testing.T) {
	c, err := New(make([]byte, 64))
	if err != nil {
		t.Fatal(err)
	}
	for i := range 3 {
		if err := c.Close(); err != nil {
			t.Fatalf("Close #%d: %v", i+1, err)
		}
	}
	mustPanic(t, "Encrypt after Close", func() { c.Encrypt(make([]byte, 16), make([]byte, 16), 0) })
	mustPanic(t, "DecryptSectors after Close", func() { c.DecryptSectors(make([]byte, 512), make([]byte, 512), 512, 0, 1) })
}

func TestMisusePanics(t *testing.T) {
	c := newTestCipher(t, make([]byte, 32), bestImpl())
	buf := make([]byte, 8192)
	cases := []struct {
		name string
		f    func()
	}{
		{"empty", func() { c.Encrypt(buf[:0], buf[:0], 0) }},
		{"not-block-multiple", func() { c.Encrypt(buf[:20], buf[:20], 0) }},
		{"short-dst", func() { c.Decrypt(buf[:16], buf[16:48], 0) }},
		{"inexact-overlap", func() { c.Encrypt(buf[16:64], buf[:48], 0) }},
		{"sector-size-zero", func() { c.EncryptSectors(buf, buf, 0, 0, 1) }},
		{"sector-size-unaligned", func() { c.EncryptSectors(buf[:1000], buf[:1000], 500, 0, 1) }},
		{"partial-sector", func() { c.DecryptSectors(buf[:1000], buf[:1000], 512, 0, 1) }},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) { mustPanic(t, tc.name, tc.f) })
	}
}

func mustPanic(t *testing.T, what string, f func()) {
	t.Helper()
	defer func() {
		if recover() == nil {
			t.Errorf("%s: did not panic", what)
		}
	}()
	f()
}

// TestImplsAvailable fails where the CPU has AES instructions but the
// package would not use them: the fast path must not silently go missing.
func TestImplsAvailable(t *testing.T) {
	t.Logf("implementations: %v (default %v)", availableImpls(), Implementation())
	if hasAESNI && Implementation() == "purego" {
		t.Fatal("the CPU has AES-NI but New would use pure Go")
	}
	if len(availableImpls()) == 0 || availableImpls()[0] != implGeneric {
		t.Fatal("the pure-Go implementation must always be available")
	}
}

// TestDroppedCipher checks that a Cipher dropped without Close still gets
// its locked buffer destroyed, and that one in use is not destroyed early.
func TestDroppedCipher(t *testing.T) {
	c, err := New(make([]byte, 64))
	if err != nil {
		t.Fatal(err)
	}
	buf := c.buf.buf
	c.Encrypt(make([]byte, 4096), make([]byte, 4096), 1)
	c = nil
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); {
		runtime.GC()
		if !buf.Alive() {
			return
		}
		time.Sleep(2 * time.Millisecond)
	}
	t.Fatal("locked buffer of an unreachable Cipher was never destroyed")
}

// TestConcurrentUse shares one Cipher between goroutines, as the storage
// adapter does; run it with -race.
func TestConcurrentUse(t *testing.T) {
	forEachImpl(t, func(t *testing.T, im impl) {
		key := bytes.Repeat([]byte{7}, 64)
		c, ref := newTestCipher(t, key, im), reference(t, key)
		errs := make(chan error, 4)
		for g := range 4 {
			go func() {
				pt := bytes.Repeat([]byte{byte(g)}, 4096)
				want, got := make([]byte, len(pt)), make([]byte, len(pt))
				for i := range 20 {
					tw := uint64(g*1000 + i)
					ref.Encrypt(want, pt, tw)
					c.Encrypt(got, pt, tw)
					if !bytes.Equal(got, want) {
						errs <- fmt.Errorf("goroutine %d: tweak %d differs from x/crypto/xts", g, tw)
						return
					}
				}
				errs <- nil
			}()
		}
		for range 4 {
			if err := <-errs; err != nil {
				t.Error(err)
			}
		}
	})
}

// TestFastPathsPresent makes a missing fast path visible: each one this CPU
// lacks is a skip naming the feature, and KEYGATE_REQUIRE=aesni,vaes turns
// the skip into a failure on machines that are meant to test them.
func TestFastPathsPresent(t *testing.T) {
	for _, tc := range []struct {
		feature string
		im      impl
	}{
		{"aesni", implAESNI},
		{"vaes", implVAES256},
		{"vaes", implVAES},
	} {
		t.Run(tc.im.String(), func(t *testing.T) {
			for _, im := range availableImpls() {
				if im == tc.im {
					return
				}
			}
			testutil.Skip(t, tc.feature, "this CPU or build (purego tag) lacks the "+tc.im.String()+" path, so it is not tested here")
		})
	}
}
