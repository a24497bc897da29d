package ninep_test

import (
	"encoding/binary"
	"io"
	"net"
	"testing"
	"time"

	"github.com/keygate/keygate/disk"
)

// wire is a 9P2000.L client that writes frames by hand: hugelgupf/p9's
// client sends Tlock without its fid and has no Tgetlock at all, and this
// test is about what the kernel sends.
type wire struct {
	t *testing.T
	c net.Conn
}

func dialWire(t *testing.T, sock string) *wire {
	t.Helper()
	c, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(30 * time.Second))
	w := &wire{t: t, c: c}
	v := binary.LittleEndian.AppendUint32(nil, 1<<16)
	w.rpc(100, 0xffff, append(v, str("9P2000.L")...), 101)
	return w
}

// rpc sends one T-message and returns the body of the reply, which must be
// of type want.
func (w *wire) rpc(typ byte, tag uint16, body []byte, want byte) []byte {
	w.t.Helper()
	f := binary.LittleEndian.AppendUint32(nil, uint32(7+len(body)))
	f = append(f, typ)
	f = binary.LittleEndian.AppendUint16(f, tag)
	if _, err := w.c.Write(append(f, body...)); err != nil {
		w.t.Fatal(err)
	}
	var hdr [7]byte
	if _, err := io.ReadFull(w.c, hdr[:]); err != nil {
		w.t.Fatalf("reply to message %d: %v", typ, err)
	}
	rb := make([]byte, binary.LittleEndian.Uint32(hdr[:])-7)
	if _, err := io.ReadFull(w.c, rb); err != nil {
		w.t.Fatal(err)
	}
	if hdr[4] != want || binary.LittleEndian.Uint16(hdr[5:]) != tag {
		w.t.Fatalf("message %d: reply type %d tag %d (%x), want type %d tag %d", typ, hdr[4], binary.LittleEndian.Uint16(hdr[5:]), rb, want, tag)
	}
	return rb
}

// open attaches, walks to name and opens it read-write on fid 2.
func (w *wire) open(name string) {
	le := binary.LittleEndian
	att := le.AppendUint32(nil, 1)
	att = le.AppendUint32(att, 0xffffffff)
	att = append(append(att, str("root")...), str("")...)
	w.rpc(104, 1, le.AppendUint32(att, 0), 105)
	walk := le.AppendUint32(le.AppendUint32(nil, 1), 2)
	w.rpc(110, 2, append(le.AppendUint16(walk, 1), str(name)...), 111)
	w.rpc(12, 3, le.AppendUint32(le.AppendUint32(nil, 2), 2), 13) // O_RDWR
}

func lockBody(typ byte, flags uint32, start, length uint64, pid uint32, client string) []byte {
	le := binary.LittleEndian
	b := append(le.AppendUint32(nil, 2), typ)
	if flags != ^uint32(0) { // Tlock has flags, Tgetlock does not
		b = le.AppendUint32(b, flags)
	}
	b = le.AppendUint64(le.AppendUint64(b, start), length)
	return append(le.AppendUint32(b, pid), str(client)...)
}

// TestGetlockOnTheWire: F_GETLK as Linux's v9fs sends it (Tgetlock) is
// answered from the same lock table Tlock fills, naming the conflicting
// lock, and the connection goes on working.
func TestGetlockOnTheWire(t *testing.T) {
	v := newVolume(t, disk.Ext4, 64<<20)
	writeFile(t, v.client(), []byte("database"), nil, "db")
	a, b := dialWire(t, v.sock), dialWire(t, v.sock)
	a.open("db")
	b.open("db")
	if st := a.rpc(52, 10, lockBody(1, 0, 100, 10, 7, "guestA"), 53); st[0] != 0 {
		t.Fatalf("A's write lock: status %d", st[0])
	}
	le := binary.LittleEndian
	for _, tc := range []struct {
		name          string
		typ           byte
		start, length uint64
		wantType      byte
		wantStart     uint64
		wantLength    uint64
		wantPid       uint32
		wantClient    string
	}{
		{"a read lock over A's write lock", 0, 105, 1, 1, 100, 10, 7, "guestA"},
		{"a write lock beside it", 1, 110, 10, 2, 110, 10, 9, "guestB"},
		{"the whole file", 1, 0, 0, 1, 100, 10, 7, "guestA"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := b.rpc(54, 20, lockBody(tc.typ, ^uint32(0), tc.start, tc.length, 9, "guestB"), 55)
			if len(r) < 27 {
				t.Fatalf("Rgetlock of %d bytes", len(r))
			}
			got := struct {
				typ           byte
				start, length uint64
				pid           uint32
				client        string
			}{r[0], le.Uint64(r[1:]), le.Uint64(r[9:]), le.Uint32(r[17:]), string(r[23:])}
			if got.typ != tc.wantType || got.start != tc.wantStart || got.length != tc.wantLength || got.pid != tc.wantPid || got.client != tc.wantClient {
				t.Fatalf("Rgetlock %+v, want type %d [%d,+%d) pid %d %q", got, tc.wantType, tc.wantStart, tc.wantLength, tc.wantPid, tc.wantClient)
			}
		})
	}
	// A probe took no lock: B's write lock beside A's still succeeds, and
	// the connection still reads.
	if st := b.rpc(52, 30, lockBody(1, 0, 110, 10, 9, "guestB"), 53); st[0] != 0 {
		t.Fatalf("B's write lock after the probes: status %d", st[0])
	}
	rd := le.AppendUint64(le.AppendUint32(nil, 2), 0)
	if r := b.rpc(116, 31, le.AppendUint32(rd, 8), 117); string(r[4:]) != "database" { // Tread
		t.Fatalf("Tread after Tgetlock: %q", r)
	}
}
