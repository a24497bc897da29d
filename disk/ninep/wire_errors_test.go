package ninep_test

import (
	"encoding/binary"
	"io"
	"net"
	"testing"
	"time"

	"github.com/keygate/keygate/disk"
)

// Errnos as Linux numbers them.
const (
	eNOENT  = 2
	eBADF   = 9
	eINVAL  = 22
	eNOSYS  = 38
	eEPROTO = 71
)

func walkNames(fid, newFID uint32, names ...string) []byte {
	b := binary.LittleEndian.AppendUint16(cat(u32(fid), u32(newFID)), uint16(len(names)))
	for _, n := range names {
		b = append(b, str(n)...)
	}
	return b
}

// TestWireErrors sends well-framed requests the server must refuse, one
// after another on one connection, and checks each Rlerror's errno; the
// connection must keep working throughout (the last request reads a file).
func TestWireErrors(t *testing.T) {
	v := newVolume(t, disk.Ext4, 64<<20)
	writeFile(t, v.client(), []byte("contents"), nil, "f")
	w := dialWire(t, v.sock) // msize 65536
	w.rpc(tAttach, 1, cat(u32(1), u32(0xFFFFFFFF), str("root"), str(""), u32(0)), tAttach+1)
	w.rpc(tWalk, 2, walkNames(1, 2, "f"), tWalk+1)
	seventeen := make([]string, 17)
	for i := range seventeen {
		seventeen[i] = "d"
	}
	for _, tc := range []struct {
		name string
		typ  byte
		body []byte
		want uint32
	}{
		{"auth", 102, cat(u32(9), str("u"), str(""), u32(0)), eNOSYS},
		{"attach with an afid", tAttach, cat(u32(9), u32(3), str("u"), str(""), u32(0)), eINVAL},
		{"attach to a fid in use", tAttach, cat(u32(1), u32(0xFFFFFFFF), str("u"), str(""), u32(0)), eBADF},
		{"walk of 17 names", tWalk, walkNames(1, 3, seventeen...), eINVAL},
		{"walk to ..", tWalk, walkNames(1, 3, ".."), eINVAL},
		{"walk a name with a slash", tWalk, walkNames(1, 3, "a/b"), eINVAL},
		{"walk a name longer than the frame", tWalk, cat(u32(1), u32(3), []byte{1, 0, 0xFF, 0xFF, 'a'}), eINVAL},
		{"walk to a missing name", tWalk, walkNames(1, 3, "nope"), eNOENT},
		{"walk through a file", tWalk, walkNames(2, 3, "x"), eINVAL},
		{"walk onto a fid in use", tWalk, walkNames(1, 2, "f"), eBADF},
		{"walk from an unknown fid", tWalk, walkNames(77, 3, "f"), eBADF},
		{"read an unopened fid", tRead, cat(u32(2), u64(0), u32(10)), eINVAL},
		{"read more than msize allows", tRead, cat(u32(2), u64(0), u32(65536-23)), eINVAL},
		{"write past its frame", tWrite, cat(u32(2), u64(0), u32(1<<20), []byte("x")), eINVAL},
		{"write an unopened fid", tWrite, cat(u32(2), u64(0), u32(1), []byte("x")), eINVAL},
		{"create in a file", 14, cat(u32(2), str("g"), u32(2), u32(0o644), u32(0)), eINVAL},
		{"mkdir named ..", 72, cat(u32(1), str(".."), u32(0o755), u32(0)), eINVAL},
		{"readdir an unopened directory", 40, cat(u32(1), u64(0), u32(4096)), eINVAL},
		{"readlink", 22, u32(2), eINVAL},
		{"symlink", 16, cat(u32(1), str("l"), str("f"), u32(0)), eNOSYS},
		{"mknod", 18, cat(u32(1), str("n"), u32(0o644), u32(0), u32(0), u32(0)), eNOSYS},
		{"link", 70, cat(u32(1), u32(2), str("h")), eNOSYS},
		{"xattrwalk", 30, cat(u32(2), u32(4), str("user.x")), eINVAL},
		{"xattrcreate", 32, cat(u32(2), str("user.x"), u64(1), u32(0)), eINVAL},
		{"unknown type", 0xEE, u32(1), eNOSYS},
		{"9P2000's Topen", 112, cat(u32(2), []byte{0}), eNOSYS},
		{"clunk an unknown fid", tClunk, u32(77), eBADF},
		{"remove the root", 122, u32(1), eINVAL},
		{"getattr cut short", 24, u32(2)[:3], eINVAL},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := w.rpc(tc.typ, 10, tc.body, 7)
			if got := binary.LittleEndian.Uint32(r); got != tc.want {
				t.Fatalf("errno %d, want %d", got, tc.want)
			}
		})
	}
	// Tremove of the root clunked fid 1 (as 9P says); the rest still works.
	w.rpc(tAttach, 11, cat(u32(1), u32(0xFFFFFFFF), str("root"), str(""), u32(0)), tAttach+1)
	w.rpc(108, 12, []byte{99, 0}, 109) // Tflush of a tag not in flight
	w.rpc(tLopen, 13, cat(u32(2), u32(0)), tLopen+1)
	if r := w.rpc(tRead, 14, cat(u32(2), u64(0), u32(100)), tRead+1); string(r[4:]) != "contents" {
		t.Fatalf("read after the errors: %q", r)
	}
}

// TestWireFraming: frames that cannot be delimited close the connection;
// requests before Tversion and unknown versions are refused in-protocol.
func TestWireFraming(t *testing.T) {
	v := newVolume(t, disk.Ext4, 64<<20)
	dial := func(t *testing.T) net.Conn {
		c, err := net.Dial("unix", v.sock)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		c.SetDeadline(time.Now().Add(30 * time.Second))
		return c
	}
	readReply := func(t *testing.T, c net.Conn) []byte {
		var hdr [4]byte
		if _, err := io.ReadFull(c, hdr[:]); err != nil {
			t.Fatalf("no reply: %v", err)
		}
		b := make([]byte, binary.LittleEndian.Uint32(hdr[:])-4)
		if _, err := io.ReadFull(c, b); err != nil {
			t.Fatal(err)
		}
		return b
	}
	for _, tc := range []struct {
		name string
		in   []byte
	}{
		{"frame larger than msize", cat(version, frame(tWrite, 1, u32(1), u64(0), u32(70000), make([]byte, 70000)))},
		{"size below the header", cat(version, u32(3), []byte{tVersion, 0, 0})},
		{"size zero", cat(version, u32(0), []byte{tVersion, 0, 0})},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := dial(t)
			c.Write(tc.in)
			if r := readReply(t, c); r[0] != tVersion+1 {
				t.Fatalf("first reply type %d, want Rversion", r[0])
			}
			// EOF, or a reset when the server closed with the frame unread
			n, err := c.Read(make([]byte, 1))
			if ne, ok := err.(net.Error); err == nil || ok && ne.Timeout() {
				t.Fatalf("after the bad frame: read %d, %v; want the connection closed", n, err)
			}
		})
	}
	t.Run("message before version", func(t *testing.T) {
		c := dial(t)
		c.Write(attach(1))
		if r := readReply(t, c); r[0] != 7 || binary.LittleEndian.Uint32(r[3:]) != eEPROTO {
			t.Fatalf("reply % x, want Rlerror EPROTO", r)
		}
	})
	for _, ver := range []string{"9P2000", "9P2000.u", "9P3000.Z"} {
		t.Run("version "+ver, func(t *testing.T) {
			c := dial(t)
			c.Write(frame(tVersion, 0xFFFF, u32(65536), str(ver)))
			r := readReply(t, c)
			if r[0] != tVersion+1 || string(r[9:]) != "unknown" {
				t.Fatalf("reply % x, want Rversion unknown", r)
			}
		})
	}
	t.Run("msize capped", func(t *testing.T) {
		c := dial(t)
		c.Write(frame(tVersion, 0xFFFF, u32(64<<20), str("9P2000.L")))
		r := readReply(t, c)
		if got := binary.LittleEndian.Uint32(r[3:]); r[0] != tVersion+1 || got != 1<<20 {
			t.Fatalf("reply % x: msize %d, want 1 MiB", r, got)
		}
	})
	alive(t, v.sock)
}

// TestFlushAfterItsRequest: a Tflush sent right behind the request it
// names is answered after that request's reply, never before (9P: the
// client may reuse the tag once Rflush arrives).
func TestFlushAfterItsRequest(t *testing.T) {
	v := newVolume(t, disk.Ext4, 64<<20)
	writeFile(t, v.client(), []byte("data"), nil, "f")
	w := dialWire(t, v.sock)
	w.open("f") // fid 2, read-write
	for i := range 20 {
		tag := uint16(100 + 2*i)
		// a write makes the fsync store something, then fsync and its flush back to back
		w.rpc(tWrite, tag, cat(u32(2), u64(0), u32(4), []byte("DATA")), tWrite+1)
		if _, err := w.c.Write(cat(frame(50, tag, u32(2), u32(0)), frame(108, tag+1, []byte{byte(tag), byte(tag >> 8)}))); err != nil {
			t.Fatal(err)
		}
		var got []byte
		for range 2 {
			var hdr [7]byte
			if _, err := io.ReadFull(w.c, hdr[:]); err != nil {
				t.Fatal(err)
			}
			if _, err := io.ReadFull(w.c, make([]byte, binary.LittleEndian.Uint32(hdr[:])-7)); err != nil {
				t.Fatal(err)
			}
			got = append(got, hdr[4])
		}
		if got[0] != 51 || got[1] != 109 {
			t.Fatalf("round %d: replies of types %v, want Rfsync (51) then Rflush (109)", i, got)
		}
	}
}
