package disk_test

import (
	"bytes"
	"io"
	mrand "math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
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

// procWriteBytes is this process's write_bytes from /proc/self/io: bytes
// it caused to be sent to storage, written-over blocks counted each time.
func procWriteBytes(b *testing.B) int64 {
	b.Helper()
	raw, err := os.ReadFile("/proc/self/io")
	if err != nil {
		b.Skipf("no /proc/self/io: %v", err)
	}
	for _, l := range strings.Split(string(raw), "\n") {
		if v, ok := strings.CutPrefix(l, "write_bytes: "); ok {
			n, err := strconv.ParseInt(v, 10, 64)
			if err != nil {
				b.Fatal(err)
			}
			return n
		}
	}
	b.Skip("no write_bytes in /proc/self/io")
	return 0
}

// BenchmarkCreateExt4 is `keygate disk create IMG --size S --fs ext4
// --key-file F` as a library call (argon2id keyslot, as the CLI's
// default), on a sparse file. It reports seconds per create, the MiB the
// image holds afterwards (allocated blocks: what was written) and the MiB
// /proc/self/io counts as written (after fsync, so nothing is pending).
// scripts/bench.sh prints it next to mkfs.ext4 -E lazy_itable_init=1.
func BenchmarkCreateExt4(b *testing.B) {
	key, err := disk.NewKey([]byte("0123456789abcdef0123456789abcdef"))
	if err != nil {
		b.Fatal(err)
	}
	defer key.Destroy()
	for _, size := range []struct {
		name string
		n    int64
	}{{"100G", 100 << 30}, {"1T", 1 << 40}} {
		b.Run(size.name, func(b *testing.B) {
			var held, io int64
			for i := 0; i < b.N; i++ {
				img := filepath.Join(b.TempDir(), "vol.img")
				w0 := procWriteBytes(b)
				res, err := disk.CreateImage(img, key, disk.CreateOptions{Size: size.n, FS: disk.Ext4})
				if err != nil {
					b.Fatal(err)
				}
				io += procWriteBytes(b) - w0
				res.Wipe()
				b.StopTimer()
				var st syscall.Stat_t
				if err := syscall.Stat(img, &st); err != nil {
					b.Fatal(err)
				}
				held += st.Blocks * 512
				os.Remove(img)
				b.StartTimer()
			}
			b.ReportMetric(b.Elapsed().Seconds()/float64(b.N), "s/create")
			b.ReportMetric(float64(held)/float64(b.N)/(1<<20), "MiB-held/create")
			b.ReportMetric(float64(io)/float64(b.N)/(1<<20), "MiB-io/create")
		})
	}
}
