package disk_test

import (
	"bytes"
	"crypto/aes"
	"crypto/rand"
	"encoding/binary"
	"io"
	mrand "math/rand/v2"
	"os"
	"path/filepath"
	"testing"

	xxts "golang.org/x/crypto/xts"

	"github.com/keygate/keygate/disk"
	"github.com/keygate/keygate/disk/xts"
)

const segOff = 32 << 10 // data segment offset in the test images

// newImage makes a temp image file of segOff+size bytes.
func newImage(t testing.TB, size int64) *os.File {
	t.Helper()
	f, err := os.Create(filepath.Join(t.TempDir(), "vol.img"))
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(segOff + size); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

func newKey(t testing.TB) ([]byte, *xts.Cipher) {
	t.Helper()
	key := make([]byte, 64)
	rand.Read(key)
	c, err := xts.New(key)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return key, c
}

func newDevice(t testing.TB, f *os.File, size int64, ss int, c *xts.Cipher, opts ...disk.Option) *disk.Device {
	t.Helper()
	d, err := disk.NewDevice(f, segOff, size, ss, c, opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	return d
}

func TestDeviceRandomOpsMatchModel(t *testing.T) {
	for _, tc := range []struct {
		name  string
		ss    int
		cache int
		plain bool
	}{
		{"512", 512, disk.DefaultCacheSize, false},
		{"4096", 4096, disk.DefaultCacheSize, false},
		{"512-tiny-cache", 512, 8 << 10, false},
		{"4096-tiny-cache", 4096, 64 << 10, false},
		{"4096-plain", 4096, disk.DefaultCacheSize, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			const size = 2 << 20
			f := newImage(t, size)
			var c *xts.Cipher
			if !tc.plain {
				_, c = newKey(t)
			}
			d := newDevice(t, f, size, tc.ss, c, disk.WithCacheSize(tc.cache))
			model := make([]byte, size)
			if _, err := d.WriteAt(model, 0); err != nil { // defined start
				t.Fatal(err)
			}
			rng := mrand.New(mrand.NewPCG(1, uint64(tc.ss)))
			for i := 0; i < 400; i++ {
				off := rng.Int64N(size)
				n := rng.IntN(300 << 10)
				if rng.IntN(4) == 0 {
					n = rng.IntN(5000)
				}
				if rng.IntN(3) == 0 {
					off -= off % int64(tc.ss)
				}
				n = int(min(int64(n), size-off))
				if rng.IntN(2) == 0 {
					buf := make([]byte, n)
					rand.Read(buf)
					if _, err := d.WriteAt(buf, off); err != nil {
						t.Fatalf("op %d: write %d at %d: %v", i, n, off, err)
					}
					copy(model[off:], buf)
				} else {
					buf := make([]byte, n)
					if _, err := d.ReadAt(buf, off); err != nil && err != io.EOF {
						t.Fatalf("op %d: read %d at %d: %v", i, n, off, err)
					}
					if !bytes.Equal(buf, model[off:off+int64(n)]) {
						t.Fatalf("op %d: read %d at %d differs from the model", i, n, off)
					}
				}
			}
			if err := d.Close(); err != nil {
				t.Fatal(err)
			}
			// reopen: everything must have reached the file
			d2 := newDevice(t, f, size, tc.ss, c)
			got := make([]byte, size)
			if _, err := d2.ReadAt(got, 0); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, model) {
				t.Fatal("content after Close and reopen differs from the model")
			}
		})
	}
}

// TestDeviceCiphertextIndependent decrypts the file with x/crypto/xts at the
// LUKS2 plain64 tweak (512-byte units), independently of disk/xts.
func TestDeviceCiphertextIndependent(t *testing.T) {
	for _, ss := range []int{512, 4096} {
		t.Run(map[int]string{512: "512", 4096: "4096"}[ss], func(t *testing.T) {
			const size = 1 << 20
			f := newImage(t, size)
			key, c := newKey(t)
			d := newDevice(t, f, size, ss, c)
			plain := make([]byte, size)
			rand.Read(plain)
			if _, err := d.WriteAt(plain[:1000], 0); err != nil { // via the cache
				t.Fatal(err)
			}
			if _, err := d.WriteAt(plain[1000:], 1000); err != nil { // mostly direct
				t.Fatal(err)
			}
			if err := d.Flush(); err != nil {
				t.Fatal(err)
			}
			ct := make([]byte, size)
			if _, err := f.ReadAt(ct, segOff); err != nil {
				t.Fatal(err)
			}
			ref, err := xxts.NewCipher(aes.NewCipher, key)
			if err != nil {
				t.Fatal(err)
			}
			for s := 0; s < size/ss; s++ {
				sec := ct[s*ss : (s+1)*ss]
				if bytes.Equal(sec, plain[s*ss:(s+1)*ss]) {
					t.Fatalf("sector %d is stored in plaintext", s)
				}
				out := make([]byte, ss)
				ref.Decrypt(out, sec, uint64(s*ss/512))
				if !bytes.Equal(out, plain[s*ss:(s+1)*ss]) {
					t.Fatalf("sector %d does not decrypt with tweak %d", s, s*ss/512)
				}
			}
		})
	}
}

func TestDeviceCacheCoherency(t *testing.T) {
	for _, tc := range []struct {
		name string
		run  func(t *testing.T, d *disk.Device)
	}{
		{"small-write-then-large-read", func(t *testing.T, d *disk.Device) {
			big := make([]byte, 512<<10)
			rand.Read(big)
			d.WriteAt(big, 0)
			d.WriteAt([]byte("hello"), 70000)
			copy(big[70000:], "hello")
			got := make([]byte, len(big))
			d.ReadAt(got, 0)
			if !bytes.Equal(got, big) {
				t.Fatal("large read missed a cached small write")
			}
		}},
		{"large-write-then-small-read", func(t *testing.T, d *disk.Device) {
			small := make([]byte, 10)
			d.ReadAt(small, 70000) // caches the sector
			big := make([]byte, 512<<10)
			rand.Read(big)
			d.WriteAt(big, 0)
			d.ReadAt(small, 70000)
			if !bytes.Equal(small, big[70000:70010]) {
				t.Fatal("small read returned a stale cached sector")
			}
		}},
		{"small-write-large-write-flush", func(t *testing.T, d *disk.Device) {
			d.WriteAt([]byte("stale"), 4096)
			big := make([]byte, 256<<10)
			rand.Read(big)
			d.WriteAt(big, 0)
			d.Flush() // must not write the stale dirty sector over big
			got := make([]byte, len(big))
			d.ReadAt(got, 0)
			if !bytes.Equal(got, big) {
				t.Fatal("a dirty sector overwritten by a large write came back")
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newImage(t, 4<<20)
			_, c := newKey(t)
			tc.run(t, newDevice(t, f, 4<<20, 4096, c))
		})
	}
}

func TestDeviceStatAndErrors(t *testing.T) {
	f := newImage(t, 1<<20)
	_, c := newKey(t)
	d := newDevice(t, f, 1<<20, 512, c)
	fi, err := d.Stat()
	if err != nil || fi.Size() != 1<<20 || !fi.Mode().IsRegular() {
		t.Fatalf("Stat = %v, %v; want a regular file of 1 MiB", fi, err)
	}
	if _, err := d.Sys(); err == nil {
		t.Error("Sys returned the ciphertext file")
	}
	if _, err := d.WriteAt([]byte{1}, 1<<20); err == nil {
		t.Error("write past the end succeeded")
	}
	if n, err := d.ReadAt(make([]byte, 10), 1<<20-4); n != 4 || err != io.EOF {
		t.Errorf("read over the end = %d, %v; want 4, EOF", n, err)
	}
	if _, err := disk.NewDevice(f, 100, 1<<20, 512, c); err == nil {
		t.Error("unaligned offset accepted")
	}
	ro := newDevice(t, f, 1<<20, 512, c, disk.ReadOnly())
	if _, err := ro.Writable(); err == nil {
		t.Error("read-only device is writable")
	}
	// Close persists writes that are still in the cache.
	d.WriteAt([]byte("persist"), 12345)
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := d.ReadAt(make([]byte, 1), 0); err == nil {
		t.Error("read after Close succeeded")
	}
	got := make([]byte, 7)
	newDevice(t, f, 1<<20, 512, c).ReadAt(got, 12345)
	if string(got) != "persist" {
		t.Errorf("after Close and reopen read %q", got)
	}
	_ = binary.LittleEndian
}
