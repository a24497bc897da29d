package disk_test

import (
	"bytes"
	"io"
	mrand "math/rand/v2"
	"testing"

	"github.com/keygate/keygate/disk"
	"github.com/keygate/keygate/disk/xts"
)

const benchFile = 256 << 20

// benchFS makes an ext4 volume big enough for one 256 MiB file, encrypted
// or not (the unencrypted one is the filesystem's own ceiling).
func benchFS(b *testing.B, encrypted bool) *disk.FS {
	b.Helper()
	const size = benchFile + 64<<20
	f := newImage(b, size)
	var c *xts.Cipher
	if encrypted {
		_, c = newKey(b)
	}
	d := newDevice(b, f, size, 4096, c)
	fsys, err := disk.Mkfs(d, disk.Ext4, "bench")
	if err != nil {
		b.Fatal(err)
	}
	return fsys
}

func benchData() []byte {
	data := make([]byte, benchFile)
	rng := mrand.NewChaCha8([32]byte{1})
	rng.Read(data)
	return data
}

var benchModes = []struct {
	name      string
	encrypted bool
}{{"ext4-encrypted", true}, {"ext4-plain", false}}

func BenchmarkFile(b *testing.B) {
	data := benchData()
	for _, m := range benchModes {
		b.Run(m.name+"/write-256M", func(b *testing.B) {
			fsys := benchFS(b, m.encrypted)
			b.SetBytes(benchFile)
			for i := 0; i < b.N; i++ {
				if i > 0 {
					b.StopTimer()
					if err := fsys.Remove("/f"); err != nil {
						b.Fatal(err)
					}
					b.StartTimer()
				}
				if err := fsys.Put("/f", bytes.NewReader(data), benchFile); err != nil {
					b.Fatal(err)
				}
				if err := fsys.Sync(); err != nil {
					b.Fatal(err)
				}
			}
		})
		b.Run(m.name+"/read-256M", func(b *testing.B) {
			fsys := benchFS(b, m.encrypted)
			if err := fsys.Put("/f", bytes.NewReader(data), benchFile); err != nil {
				b.Fatal(err)
			}
			b.SetBytes(benchFile)
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				if _, err := fsys.Get("/f", io.Discard); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

func BenchmarkRandomRead4K(b *testing.B) {
	data := benchData()
	for _, m := range benchModes {
		b.Run(m.name, func(b *testing.B) {
			fsys := benchFS(b, m.encrypted)
			if err := fsys.Put("/f", bytes.NewReader(data), benchFile); err != nil {
				b.Fatal(err)
			}
			r, err := fsys.Open("/f")
			if err != nil {
				b.Fatal(err)
			}
			rng := mrand.New(mrand.NewPCG(1, 2))
			buf := make([]byte, 4096)
			b.SetBytes(4096)
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				off := rng.Int64N(benchFile/4096) * 4096
				if _, err := r.ReadAt(buf, off); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "iops")
		})
	}
}
