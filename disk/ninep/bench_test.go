package ninep_test

import (
	"bytes"
	"io"
	mrand "math/rand/v2"
	"net"
	"testing"

	"github.com/hugelgupf/p9/p9"

	"github.com/keygate/keygate/disk"
)

const benchSize = 16 << 20

// benchMsize is what Linux 6.x negotiates by default (msize=512k), so the
// 9P figures are those a kernel mount would see, less the kernel's cost.
const benchMsize = 512 << 10

// BenchmarkSequential writes then reads one 16 MiB file over 9P (a
// client on a unix socket) and directly through disk.FS, on an encrypted
// ext4 volume. A write ends with the data durable in both cases (clunk
// over 9P, Put+Sync directly). Compare the MB/s of 9p/* with direct/*.
func BenchmarkSequential(b *testing.B) {
	data := make([]byte, benchSize)
	mrand.NewChaCha8([32]byte{9}).Read(data)
	for _, typ := range []disk.FSType{disk.Ext4, disk.FAT32} {
		v := newVolume(b, typ, 96<<20)
		conn, err := net.Dial("unix", v.sock)
		if err != nil {
			b.Fatal(err)
		}
		c, err := p9.NewClient(conn, p9.WithMessageSize(benchMsize))
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { c.Close() })
		root, err := c.Attach("/")
		if err != nil {
			b.Fatal(err)
		}
		remove := func(b *testing.B) {
			b.StopTimer()
			if err := v.fsys.Remove("/f"); err != nil {
				b.Fatal(err)
			}
			b.StartTimer()
		}
		b.Run(string(typ)+"/direct/write", func(b *testing.B) {
			b.SetBytes(benchSize)
			for b.Loop() {
				if err := v.fsys.Put("/f", bytes.NewReader(data), benchSize); err != nil {
					b.Fatal(err)
				}
				if err := v.fsys.Sync(); err != nil {
					b.Fatal(err)
				}
				remove(b)
			}
		})
		b.Run(string(typ)+"/9p/write", func(b *testing.B) {
			b.SetBytes(benchSize)
			for b.Loop() {
				f := create(b, root, "f")
				if _, err := f.WriteAt(data, 0); err != nil {
					b.Fatal(err)
				}
				if err := f.Close(); err != nil {
					b.Fatal(err)
				}
				remove(b)
			}
		})
		if err := v.fsys.Put("/f", bytes.NewReader(data), benchSize); err != nil {
			b.Fatal(err)
		}
		b.Run(string(typ)+"/direct/read", func(b *testing.B) {
			b.SetBytes(benchSize)
			for b.Loop() {
				if n, err := v.fsys.Get("/f", io.Discard); err != nil || n != benchSize {
					b.Fatal(n, err)
				}
			}
		})
		buf := make([]byte, benchSize)
		b.Run(string(typ)+"/9p/read", func(b *testing.B) {
			b.SetBytes(benchSize)
			for b.Loop() {
				f := mustWalk(b, root, "f")
				if _, _, err := f.Open(p9.ReadOnly); err != nil {
					b.Fatal(err)
				}
				if n, err := f.ReadAt(buf, 0); n != benchSize || (err != nil && err != io.EOF) {
					b.Fatal(n, err)
				}
				f.Close()
			}
		})
	}
}
