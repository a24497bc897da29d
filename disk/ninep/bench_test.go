package ninep_test

import (
	"bytes"
	"fmt"
	"io"
	mrand "math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
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

// benchClient is a 9P client with the kernel's msize on v.
func benchClient(b *testing.B, v *volume) p9.File { return attachAt(b, v.sock) }

// attachAt attaches a 9P client with the kernel's msize to the server
// on the unix socket sock.
func attachAt(b *testing.B, sock string) p9.File {
	conn, err := net.Dial("unix", sock)
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
	return root
}

// BenchmarkCommit is a database's commit: a 4 KiB write at a random
// block-aligned offset of an existing file, then fsync, over 9P on an
// encrypted ext4 volume and on a plain file in the same temp directory.
// scripts/bench.sh prints commits/s and the ratio of 64M to 1M: a commit
// should cost what it writes, not what the file holds.
func BenchmarkCommit(b *testing.B) {
	page := make([]byte, 4096)
	for _, sz := range []int64{1 << 20, 64 << 20} {
		name := fmt.Sprintf("%dM", sz>>20)
		data := make([]byte, sz)
		mrand.NewChaCha8([32]byte{7}).Read(data)
		b.Run("9p/"+name, func(b *testing.B) {
			v := newVolume(b, disk.Ext4, sz+48<<20)
			if err := v.fsys.Put("/db", bytes.NewReader(data), sz); err != nil {
				b.Fatal(err)
			}
			f := mustWalk(b, benchClient(b, v), "db")
			if _, _, err := f.Open(p9.ReadWrite); err != nil {
				b.Fatal(err)
			}
			rng := mrand.New(mrand.NewPCG(1, 2))
			for b.Loop() {
				if _, err := f.WriteAt(page, rng.Int64N(sz/4096)*4096); err != nil {
					b.Fatal(err)
				}
				if err := f.FSync(); err != nil {
					b.Fatal(err)
				}
			}
			f.Close()
		})
		b.Run("plain/"+name, func(b *testing.B) {
			p := filepath.Join(b.TempDir(), "db")
			if err := os.WriteFile(p, data, 0o600); err != nil {
				b.Fatal(err)
			}
			f, err := os.OpenFile(p, os.O_RDWR, 0)
			if err != nil {
				b.Fatal(err)
			}
			defer f.Close()
			rng := mrand.New(mrand.NewPCG(1, 2))
			for b.Loop() {
				if _, err := f.WriteAt(page, rng.Int64N(sz/4096)*4096); err != nil {
					b.Fatal(err)
				}
				if err := f.Sync(); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

const bigSize = 256 << 20

// BenchmarkBigFile writes a 256 MiB file over 9P with one fsync at the
// end, and reads it back, on an encrypted ext4 volume; the references are
// dd conv=fsync writing the same bytes to a plain file, and reading a
// plain copy from the page cache (dd to /dev/null, and this process's own
// ReadAt loop with the 9P read size), in the same run. null/read is the
// transport's ceiling: the same client reading from a 9P server whose
// reads cost nothing (bench_null_test.go), so 9p/read over null/read is
// what the server's own work leaves of it. The 9P client sends
// what a kernel mount would: msize-sized (512 KiB) messages, one at a
// time. A kernel mount's sequential reader has one Tread in flight too:
// netfs issues a readahead's subrequests in turn, and 9P's issue_read
// (v9fs_issue_read) waits in p9_client_read for each reply.
func BenchmarkBigFile(b *testing.B) {
	data := offHeap(b, bigSize)
	mrand.NewChaCha8([32]byte{8}).Read(data)
	dir := b.TempDir()
	src := filepath.Join(dir, "src")
	if err := os.WriteFile(src, data, 0o600); err != nil {
		b.Fatal(err)
	}
	chunk := benchMsize - 64 // room for the Twrite header
	b.Run("9p/write", func(b *testing.B) {
		v := newVolume(b, disk.Ext4, bigSize+64<<20)
		root := benchClient(b, v)
		b.SetBytes(bigSize)
		for b.Loop() {
			f := create(b, root, "big")
			for off := 0; off < bigSize; off += chunk {
				if _, err := f.WriteAt(data[off:min(off+chunk, bigSize)], int64(off)); err != nil {
					b.Fatal(err)
				}
			}
			if err := f.FSync(); err != nil {
				b.Fatal(err)
			}
			f.Close()
			b.StopTimer()
			if err := v.fsys.Remove("/big"); err != nil {
				b.Fatal(err)
			}
			b.StartTimer()
		}
	})
	b.Run("dd/write", func(b *testing.B) {
		dd, err := exec.LookPath("dd")
		if err != nil {
			b.Skip("no dd")
		}
		b.SetBytes(bigSize)
		for b.Loop() {
			dst := filepath.Join(dir, "dst")
			if out, err := exec.Command(dd, "if="+src, "of="+dst, "bs=1M", "conv=fsync", "status=none").CombinedOutput(); err != nil {
				b.Fatalf("dd: %v: %s", err, out)
			}
			b.StopTimer()
			os.Remove(dst)
			b.StartTimer()
		}
	})
	buf := make([]byte, chunk)
	b.Run("9p/read", func(b *testing.B) {
		v := newVolume(b, disk.Ext4, bigSize+64<<20)
		root := benchClient(b, v)
		if err := v.fsys.Put("/big", bytes.NewReader(data), bigSize); err != nil {
			b.Fatal(err)
		}
		readBig(b, root, buf)
	})
	b.Run("null/read", func(b *testing.B) {
		root := nullRoot(b)
		readBig(b, root, buf)
	})
	// The two halves of a Tread that a server can't skip, each alone:
	// direct/read is the server's work (the filesystem, a pread and XTS)
	// with no transport, socket/read the transport with no 9P at all (a
	// small request, a reply of len(buf) bytes in one writev, read by
	// the client with one read loop). With one request in flight they
	// add up: no 9P server is faster than both in series.
	b.Run("direct/read", func(b *testing.B) {
		v := newVolume(b, disk.Ext4, bigSize+64<<20)
		if err := v.fsys.Put("/big", bytes.NewReader(data), bigSize); err != nil {
			b.Fatal(err)
		}
		f, err := v.fsys.OpenFile("/big", os.O_RDONLY)
		if err != nil {
			b.Fatal(err)
		}
		defer f.Close()
		readAll(b, f, buf)
	})
	b.Run("socket/read", func(b *testing.B) {
		readAll(b, socketReader(b, len(buf)), buf)
	})
	b.Run("dd/read", func(b *testing.B) {
		dd, err := exec.LookPath("dd")
		if err != nil {
			b.Skip("no dd")
		}
		b.SetBytes(bigSize)
		for b.Loop() {
			if out, err := exec.Command(dd, "if="+src, "of=/dev/null", "bs=1M", "status=none").CombinedOutput(); err != nil {
				b.Fatalf("dd: %v: %s", err, out)
			}
		}
	})
	b.Run("plain/read", func(b *testing.B) {
		f, err := os.Open(src)
		if err != nil {
			b.Fatal(err)
		}
		defer f.Close()
		readAll(b, f, buf)
	})
}

// readAll reads bigSize bytes from r, len(buf) at a time, once per
// iteration of b.
func readAll(b *testing.B, r io.ReaderAt, buf []byte) {
	b.SetBytes(bigSize)
	for b.Loop() {
		readThrough(b, r, buf)
	}
}

// readThrough reads bigSize bytes from r, len(buf) at a time.
func readThrough(b *testing.B, r io.ReaderAt, buf []byte) {
	for off := int64(0); off < bigSize; {
		n, err := r.ReadAt(buf, off)
		if n == 0 {
			b.Fatalf("read at %d: %v", off, err)
		}
		off += int64(n)
	}
}

// socketReader is a ReaderAt whose every ReadAt is one exchange on a unix
// socket with a server in this process, shaped as a Tread and its Rread
// (23 bytes out; 11 bytes and len(p) of payload back, sent with one
// writev from a 1 MiB send buffer, as the keygate server sends), and no
// other work on either side.
func socketReader(b *testing.B, size int) io.ReaderAt {
	l, err := net.Listen("unix", filepath.Join(b.TempDir(), "raw.sock"))
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { l.Close() })
	go func() {
		c, err := l.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		c.(*net.UnixConn).SetWriteBuffer(1 << 20)
		req, reply := make([]byte, 23), make([]byte, size)
		for {
			if _, err := io.ReadFull(c, req); err != nil {
				return
			}
			bufs := net.Buffers{req[:11], reply}
			if _, err := bufs.WriteTo(c); err != nil {
				return
			}
		}
	}()
	c, err := net.Dial("unix", l.Addr().String())
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { c.Close() })
	return &rawExchange{c: c, req: make([]byte, 23), hdr: make([]byte, 11)}
}

type rawExchange struct {
	c        net.Conn
	req, hdr []byte
}

func (r *rawExchange) ReadAt(p []byte, _ int64) (int, error) {
	if _, err := r.c.Write(r.req); err != nil {
		return 0, err
	}
	if _, err := io.ReadFull(r.c, r.hdr); err != nil {
		return 0, err
	}
	return io.ReadFull(r.c, p)
}

// readBig reads "big" under root to its end, bigSize bytes, len(buf) at
// a time, once per iteration of b.
func readBig(b *testing.B, root p9.File, buf []byte) {
	b.SetBytes(bigSize)
	for b.Loop() {
		f := mustWalk(b, root, "big")
		if _, _, err := f.Open(p9.ReadOnly); err != nil {
			b.Fatal(err)
		}
		readThrough(b, f, buf)
		f.Close()
	}
}

// offHeap is n bytes of memory outside the Go heap, unmapped at the end
// of b. The client's buffers belong to the guest, not to the server: held
// on the heap the server shares here, 256 MiB of them would set the
// garbage collector's pace for the server's own buffers as no real
// server process sees.
func offHeap(b *testing.B, n int) []byte {
	m, err := syscall.Mmap(-1, 0, n, syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_PRIVATE|syscall.MAP_ANON)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { syscall.Munmap(m) })
	return m
}
