package nbd_test

import (
	"bytes"
	"net"
	"os"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/keygate/keygate/disk/nbd"
)

// kernelPair is a socket pair whose server end is wrapped as Attach wraps
// the kernel's (blocking system calls, no poller).
func kernelPair(t *testing.T) (client, server net.Conn) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	f := os.NewFile(uintptr(fds[0]), "client")
	client, err = net.FileConn(f)
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { client.Close() })
	server, err = nbd.KernelSocket(fds[1])
	if err != nil {
		t.Fatal(err)
	}
	return client, server
}

// TestKernelSocketServing serves a kernel-style socket: requests alone on
// the connection (served on the reader's thread, whatever their size and
// type), a queue of them (served by handlers, replies in any order), and
// the data of each read back as written.
func TestKernelSocketServing(t *testing.T) {
	const size = 4 << 20
	b := newFileBackend(t, size)
	srv := nbd.NewServer(b, nbd.Options{MaxInFlight: 8})
	defer srv.Close()
	cl, sv := kernelPair(t)
	done := make(chan error, 1)
	go func() { done <- srv.ServeKernelStyle(sv, nil) }()
	c := &rawClient{t: t, c: cl}
	data := func(seed byte, n int) []byte { return bytes.Repeat([]byte{seed, seed + 1, 7}, n/3+1)[:n] }

	for _, tc := range []struct {
		name   string
		off    uint64
		length int
		queue  int // requests sent before the first reply is read
	}{
		{"alone, 4 KiB", 8192, 4096, 1},
		{"alone, 512 bytes unaligned", 4097, 512, 1},
		{"alone, 1 MiB (read-ahead, writeback)", 1 << 20, 1 << 20, 1},
		{"a queue of 4 KiB", 0, 4096, 8},
		{"a queue of 128 KiB", 2 << 20, 128 << 10, 6},
	} {
		t.Run(tc.name, func(t *testing.T) {
			want := map[uint64][]byte{}
			for i := range tc.queue {
				off := tc.off + uint64(i*tc.length)
				p := data(byte(i+1), tc.length)
				want[off] = p
				c.write(append(req(nbd.CmdWrite, 0, off, off, uint32(tc.length)), p...))
			}
			for range tc.queue {
				if errno, cookie := c.reply(); errno != 0 || want[cookie] == nil {
					t.Fatalf("WRITE reply: errno %d, cookie %d", errno, cookie)
				}
			}
			for off := range want {
				c.write(req(nbd.CmdRead, 0, off, off, uint32(tc.length)))
			}
			for range tc.queue {
				errno, cookie := c.reply()
				if errno != 0 || want[cookie] == nil {
					t.Fatalf("READ reply: errno %d, cookie %d", errno, cookie)
				}
				if got := c.read(tc.length); !bytes.Equal(got, want[cookie]) {
					t.Fatalf("READ at %d: the data differs from what was written", cookie)
				}
				disk := make([]byte, tc.length)
				if _, err := b.ReadAt(disk, int64(cookie)); err != nil || !bytes.Equal(disk, want[cookie]) {
					t.Fatalf("the backend at %d does not hold what was acknowledged (err %v)", cookie, err)
				}
			}
		})
	}
	// WRITE_ZEROES and FLUSH alone, as ext4 sends them, on the same path:
	// the range written above reads back as zeroes.
	c.write(req(nbd.CmdWriteZeroes, 0, 3, 8192, 4096))
	if errno, _ := c.reply(); errno != 0 {
		t.Fatalf("WRITE_ZEROES reply: errno %d", errno)
	}
	c.write(req(nbd.CmdFlush, 0, 4, 0, 0))
	if errno, _ := c.reply(); errno != 0 {
		t.Fatalf("FLUSH reply: errno %d", errno)
	}
	c.write(req(nbd.CmdRead, 0, 5, 8192, 4096))
	if errno, _ := c.reply(); errno != 0 {
		t.Fatalf("READ reply: errno %d", errno)
	}
	if got := c.read(4096); !bytes.Equal(got, make([]byte, 4096)) {
		t.Fatal("READ after WRITE_ZEROES: not zeroes")
	}
	// Bad requests on this path get the same error replies.
	for _, bad := range []struct {
		what string
		r    []byte
	}{
		{"READ past the end", req(nbd.CmdRead, 0, 1, size, 4096)},
		{"FLUSH with a range", req(nbd.CmdFlush, 0, 6, 0, 4096)},
		{"WRITE_ZEROES past the end", req(nbd.CmdWriteZeroes, 0, 7, size, 4096)},
	} {
		c.write(bad.r)
		if errno, _ := c.reply(); errno == 0 {
			t.Fatalf("%s answered without error", bad.what)
		}
	}
	c.write(req(nbd.CmdDisc, 0, 2, 0, 0))
	if err := <-done; err != nil {
		t.Fatalf("serve after NBD_CMD_DISC: %v", err)
	}
	if err := c.closed(); err != nil {
		t.Fatal(err)
	}
}

// TestKernelSocketClose: Server.Close must wake a reader blocked in read(2)
// on a kernel socket (closing the descriptor alone would not), and a
// client that hangs up ends the connection.
func TestKernelSocketClose(t *testing.T) {
	for _, tc := range []struct {
		name  string
		close func(srv *nbd.Server, client net.Conn)
	}{
		{"server closes", func(srv *nbd.Server, _ net.Conn) { srv.Close() }},
		{"client hangs up", func(_ *nbd.Server, client net.Conn) { client.Close() }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv := nbd.NewServer(newFileBackend(t, 1<<20), nbd.Options{})
			cl, sv := kernelPair(t)
			done := make(chan error, 1)
			go func() { done <- srv.ServeKernelStyle(sv, nil) }()
			c := &rawClient{t: t, c: cl}
			c.write(req(nbd.CmdRead, 0, 1, 0, 4096)) // the reader is serving, then blocks
			if errno, _ := c.reply(); errno != 0 {
				t.Fatalf("READ: errno %d", errno)
			}
			c.read(4096)
			time.Sleep(50 * time.Millisecond) // into read(2)
			go tc.close(srv, cl)              // Close waits for the reader: a hang, not a return, if it was not woken
			select {
			case <-done:
			case <-time.After(10 * time.Second):
				// The server is left hanging: its Close would wait too.
				t.Fatal("the server's reader was not woken within 10 s")
			}
			srv.Close()
		})
	}
}
