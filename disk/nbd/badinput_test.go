package nbd_test

import (
	"bytes"
	"encoding/binary"
	"net"
	"testing"
	"time"

	"github.com/keygate/keygate/disk/nbd"
)

const (
	einval = 22
	enospc = 28
	eperm  = 1
)

func req(typ uint16, flags uint16, cookie, off uint64, length uint32) []byte {
	return nbd.Request{Type: typ, Flags: flags, Cookie: cookie, Offset: off, Length: length}.Marshal()
}

// TestBadRequests sends what a broken or hostile client might, after a
// good handshake. Each gets the protocol's error reply (and the connection
// goes on: a good READ follows) or a clean close; nothing is written that
// was not acknowledged.
func TestBadRequests(t *testing.T) {
	const size = 1 << 20
	for _, tc := range []struct {
		name     string
		readOnly bool
		send     []byte
		errno    uint32 // the reply's error; ignored when closes
		closes   bool
	}{
		{name: "bad magic", send: append([]byte{0xde, 0xad, 0xbe, 0xef}, make([]byte, 24)...), closes: true},
		{name: "unknown command", send: req(99, 0, 7, 0, 512), errno: einval},
		{name: "trim is not offered", send: req(nbd.CmdTrim, 0, 7, 0, 4096), errno: einval},
		{name: "block status is not offered", send: req(nbd.CmdBlockStatus, 0, 7, 0, 4096), errno: einval},
		{name: "unknown flag", send: req(nbd.CmdRead, 1<<9, 7, 0, 512), errno: einval},
		{name: "read past the end", send: req(nbd.CmdRead, 0, 7, size-512, 1024), errno: einval},
		{name: "read at a huge offset", send: req(nbd.CmdRead, 0, 7, 1<<63, 512), errno: einval},
		{name: "read of zero bytes", send: req(nbd.CmdRead, 0, 7, 0, 0), errno: einval},
		{name: "oversized read", send: req(nbd.CmdRead, 0, 7, 0, nbd.DefaultMaxRequest+1), errno: einval},
		{name: "write past the end", send: append(req(nbd.CmdWrite, 0, 7, size-512, 1024), bytes.Repeat([]byte{0xaa}, 1024)...), errno: enospc},
		{name: "write zeroes past the end", send: req(nbd.CmdWriteZeroes, 0, 7, size, 512), errno: enospc},
		{name: "flush with a length", send: req(nbd.CmdFlush, 0, 7, 0, 512), errno: einval},
		{name: "write to a read-only export", readOnly: true, send: append(req(nbd.CmdWrite, 0, 7, 0, 512), bytes.Repeat([]byte{0xaa}, 512)...), errno: eperm},
		{name: "oversized write", send: req(nbd.CmdWrite, 0, 7, 0, nbd.DefaultMaxRequest+1), closes: true},
		{name: "write cut short by a disconnect", send: append(req(nbd.CmdWrite, 0, 7, 0, 4096), bytes.Repeat([]byte{0xaa}, 1000)...), closes: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := newFileBackend(t, size)
			_, sock := serve(t, b, nbd.Options{ReadOnly: tc.readOnly})
			c := dialRaw(t, sock)
			c.goExport()
			c.write(tc.send)
			if tc.closes {
				if tc.name == "write cut short by a disconnect" {
					c.c.(*net.UnixConn).CloseWrite()
				}
				c.c.SetReadDeadline(time.Now().Add(10 * time.Second))
				if err := c.closed(); err != nil {
					t.Fatal(err)
				}
			} else {
				errno, cookie := c.reply()
				if errno != tc.errno || cookie != 7 {
					t.Fatalf("reply errno %d cookie %d, want errno %d cookie 7", errno, cookie, tc.errno)
				}
				// The connection is still in step: a good read works.
				c.write(req(nbd.CmdRead, 0, 8, 0, 512))
				if errno, cookie := c.reply(); errno != 0 || cookie != 8 {
					t.Fatalf("good READ after the bad request: errno %d cookie %d", errno, cookie)
				}
				c.read(512)
			}
			// Nothing refused or cut short reached the backend.
			got := make([]byte, size)
			if _, err := b.ReadAt(got, 0); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, make([]byte, size)) {
				t.Fatal("the backend changed, though no write was acknowledged")
			}
		})
	}
}

// TestBadHandshakes covers the option phase: unknown options and names are
// refused by reply and the handshake goes on; garbage closes.
func TestBadHandshakes(t *testing.T) {
	name := func(n string) []byte {
		b := binary.BigEndian.AppendUint32(nil, uint32(len(n)))
		return append(append(b, n...), 0, 0)
	}
	for _, tc := range []struct {
		name    string
		flags   uint32
		opt     uint32
		data    []byte
		rawSend []byte // sent instead of an option
		reply   uint32 // expected reply type; 0 means the server closes
	}{
		{name: "unknown client flags", flags: 1 << 7, reply: 0},
		{name: "bad option magic", flags: 3, rawSend: make([]byte, 16), reply: 0},
		{name: "oversized option", flags: 3, opt: 7, data: make([]byte, 8192), reply: 0},
		{name: "unknown option", flags: 3, opt: 200, reply: 1<<31 | 1},
		{name: "starttls", flags: 3, opt: 5, reply: 1<<31 | 2},
		{name: "unknown export", flags: 3, opt: 7, data: name("nope"), reply: 1<<31 | 6},
		{name: "truncated go", flags: 3, opt: 7, data: []byte{0, 0, 1, 0}, reply: 1<<31 | 3},
		{name: "info count mismatch", flags: 3, opt: 6, data: []byte{0, 0, 0, 0, 0, 5, 0, 3}, reply: 1<<31 | 3},
		{name: "info", flags: 3, opt: 6, data: name(""), reply: 3},
		{name: "list", flags: 3, opt: 3, reply: 2},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, sock := serve(t, newFileBackend(t, 1<<20), nbd.Options{Name: "vol"})
			c := dialRaw(t, sock)
			c.hello(tc.flags)
			c.c.SetReadDeadline(time.Now().Add(10 * time.Second))
			switch {
			case tc.rawSend != nil:
				c.write(tc.rawSend)
			case tc.flags&^3 == 0:
				c.option(tc.opt, tc.data)
			}
			if tc.reply == 0 {
				if err := c.closed(); err != nil {
					t.Fatal(err)
				}
				return
			}
			if typ, data := c.optReply(); typ != tc.reply {
				t.Fatalf("reply type 0x%x (%q), want 0x%x", typ, data, tc.reply)
			}
			// A successful INFO or LIST ends with an ACK.
			for typ := tc.reply; typ < 1<<31 && typ != 1; {
				typ, _ = c.optReply()
			}
			// A refused option leaves the handshake usable.
			c.option(7, name("vol"))
			for {
				typ, data := c.optReply()
				if typ == 1 {
					break
				}
				if typ != 3 && typ != 2 {
					t.Fatalf("NBD_OPT_GO after the case: reply 0x%x %q", typ, data)
				}
			}
			c.write(req(nbd.CmdRead, 0, 1, 0, 512))
			if errno, _ := c.reply(); errno != 0 {
				t.Fatalf("READ after the handshake: errno %d", errno)
			}
		})
	}
}

// TestCloseWaitsForRequests: Close returns only when no request is under
// way, so the caller can then wipe the key the backend uses.
func TestCloseWaitsForRequests(t *testing.T) {
	gate := make(chan struct{})
	b := &slowBackend{fileBackend: newFileBackend(t, 1<<20), gate: gate, entered: make(chan struct{}, 1)}
	srv, sock := serve(t, b, nbd.Options{})
	c := dialRaw(t, sock)
	c.goExport()
	c.write(append(req(nbd.CmdWrite, 0, 1, 0, 512), make([]byte, 512)...))
	<-b.entered
	closed := make(chan struct{})
	go func() { srv.Close(); close(closed) }()
	select {
	case <-closed:
		t.Fatal("Close returned while a WRITE was under way")
	case <-time.After(100 * time.Millisecond):
	}
	close(gate)
	<-closed
	if !b.finished {
		t.Fatal("the WRITE under way did not finish before Close returned")
	}
}

type slowBackend struct {
	fileBackend
	gate     chan struct{}
	entered  chan struct{}
	finished bool
}

func (s *slowBackend) WriteAt(p []byte, off int64) (int, error) {
	s.entered <- struct{}{}
	<-s.gate
	n, err := s.fileBackend.WriteAt(p, off)
	s.finished = true
	return n, err
}
