package nbd_test

import (
	"bytes"
	"encoding/binary"
	"io"
	"net"
	"testing"
	"time"

	"github.com/keygate/keygate/disk/nbd"
)

// FuzzParseRequest: any 28 bytes either fail on the magic or round-trip.
func FuzzParseRequest(f *testing.F) {
	f.Add(req(nbd.CmdRead, 0, 1, 0, 512))
	f.Add(req(nbd.CmdWrite, nbd.CmdFlagFUA, 1<<63, 1<<40, 1<<25))
	f.Add(req(nbd.CmdWriteZeroes, nbd.CmdFlagNoHole, 0, 4096, 0))
	f.Add([]byte("not a request at all, wrong magic"))
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := nbd.ParseRequest(b)
		if err != nil {
			return
		}
		if got := r.Marshal(); !bytes.Equal(got, b[:28]) {
			t.Fatalf("round trip: %x, want %x", got, b[:28])
		}
	})
}

// FuzzServer feeds arbitrary bytes to a server after a good handshake, as
// one client's requests, and checks the server neither panics nor hangs:
// it answers or closes, and Close returns.
func FuzzServer(f *testing.F) {
	f.Add(req(nbd.CmdRead, 0, 1, 0, 512))
	f.Add(append(req(nbd.CmdWrite, nbd.CmdFlagFUA, 2, 4096, 8), "12345678"...))
	f.Add(append(req(nbd.CmdWrite, 0, 2, 4095, 3), "abc"...))
	f.Add(req(nbd.CmdWriteZeroes, 0, 3, 100, 5000))
	f.Add(req(nbd.CmdFlush, 0, 4, 0, 0))
	f.Add(req(nbd.CmdDisc, 0, 5, 0, 0))
	f.Add(req(nbd.CmdRead, 0, 6, 1<<62, 1<<31))
	f.Add(append(req(nbd.CmdRead, 0, 1, 0, 512), req(99, 0xffff, 1, 0, 0)...))
	f.Fuzz(func(t *testing.T, in []byte) {
		b := memBackend(make([]byte, 64<<10))
		srv := nbd.NewServer(b, nbd.Options{MaxRequest: 1 << 20})
		cl, sv := net.Pipe()
		done := make(chan error, 1)
		go func() { done <- srv.ServeConn(sv) }()
		// Drain whatever the server says, so it never blocks on a write.
		go io.Copy(io.Discard, cl)
		cl.SetDeadline(time.Now().Add(5 * time.Second))
		hs := binary.BigEndian.AppendUint32(nil, 3)
		hs = binary.BigEndian.AppendUint64(hs, 0x49484156454f5054)
		hs = binary.BigEndian.AppendUint32(hs, 7)
		hs = binary.BigEndian.AppendUint32(hs, 6)
		hs = append(hs, 0, 0, 0, 0, 0, 0)
		cl.Write(hs)
		cl.Write(in)
		cl.Close()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Fatal("server still serving 10 s after the client closed")
		}
		srv.Close()
	})
}

// memBackend is a backend in memory: the fuzzer runs thousands of servers.
type memBackend []byte

func (m memBackend) ReadAt(p []byte, off int64) (int, error)  { return copy(p, m[off:]), nil }
func (m memBackend) WriteAt(p []byte, off int64) (int, error) { return copy(m[off:], p), nil }
func (m memBackend) Sync() error                              { return nil }
func (m memBackend) Size() int64                              { return int64(len(m)) }
