package nbd_test

import (
	"testing"

	"github.com/keygate/keygate/disk/nbd"
)

// BenchmarkRequest4K runs 4 KiB requests over a unix socket against an
// encrypted volume, at queue depth 1 and 16: its allocs/op are the
// server's and the raw client's allocations per request, and ns/op the
// round trip (make bench compares servers; this is for profiling:
// go test -run '^$' -bench Request4K -benchmem -cpuprofile ...).
func BenchmarkRequest4K(b *testing.B) {
	_, _, im := encrypted(b, 32<<20, 4096)
	blocks := im.Blocks()
	_, sock := serve(b, blocks, nbd.Options{MinBlock: 4096, PreferredBlock: 4096})
	for _, bc := range []struct {
		name  string
		typ   uint16
		depth int
	}{
		{"read/qd1", nbd.CmdRead, 1}, {"read/qd16", nbd.CmdRead, 16},
		{"write/qd1", nbd.CmdWrite, 1}, {"write/qd16", nbd.CmdWrite, 16},
	} {
		b.Run(bc.name, func(b *testing.B) {
			c := dialRaw(b, sock)
			c.goExport()
			payload := make([]byte, 4096)
			var batch []byte
			for i := range bc.depth {
				batch = append(batch, req(bc.typ, 0, uint64(i), uint64(i*37%4096)*4096, 4096)...)
				if bc.typ == nbd.CmdWrite {
					batch = append(batch, payload...)
				}
			}
			b.ReportAllocs()
			b.SetBytes(int64(4096 * bc.depth))
			for b.Loop() {
				c.write(batch)
				for range bc.depth {
					if errno, _ := c.reply(); errno != 0 {
						b.Fatalf("errno %d", errno)
					}
					if bc.typ == nbd.CmdRead {
						c.read(4096)
					}
				}
			}
		})
	}
}
