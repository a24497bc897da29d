package nbd_test

import (
	"net"
	"os"
	"sync/atomic"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/keygate/keygate/disk/nbd"
	"github.com/keygate/keygate/internal/testutil"
)

// TestKernelStyleServing runs the path Attach gives the kernel (no
// handshake, serving threads marked PR_SET_IO_FLUSHER) over a socket pair,
// and checks that every thread that served was marked.
func TestKernelStyleServing(t *testing.T) {
	b := newFileBackend(t, 1<<20)
	srv := nbd.NewServer(b, nbd.Options{MaxInFlight: 4})
	defer srv.Close()
	cl, sv := socketPair(t)
	var inits, marked atomic.Int32
	var initErr atomic.Value
	done := make(chan error, 1)
	go func() {
		done <- srv.ServeKernelStyle(sv, func() error {
			inits.Add(1)
			if err := nbd.IOFlusher(); err != nil {
				initErr.Store(err)
				return err
			}
			if v, err := unix.PrctlRetInt(unix.PR_GET_IO_FLUSHER, 0, 0, 0, 0); err == nil && v == 1 {
				marked.Add(1)
			}
			return nil
		})
	}()
	c := &rawClient{t: t, c: cl}
	for i := range 8 {
		c.write(append(req(nbd.CmdWrite, nbd.CmdFlagFUA, uint64(i), uint64(i)*4096, 4096), make([]byte, 4096)...))
	}
	for range 8 {
		if errno, _ := c.reply(); errno != 0 {
			t.Fatalf("WRITE: errno %d", errno)
		}
	}
	c.write(req(nbd.CmdDisc, 0, 99, 0, 0))
	if err := <-done; err != nil {
		t.Fatalf("serve: %v", err)
	}
	if got := inits.Load(); got != 5 {
		t.Fatalf("threadInit ran on %d threads, want 5 (the reader and 4 workers)", got)
	}
	if err, _ := initErr.Load().(error); err != nil {
		// This build sandbox withholds CAP_SYS_RESOURCE even from root;
		// the test VM's guest has it.
		testutil.Skip(t, "io-flusher", "PR_SET_IO_FLUSHER refused: "+err.Error())
	}
	if got := marked.Load(); got != 5 {
		t.Fatalf("%d of 5 serving threads read back PR_GET_IO_FLUSHER=1", got)
	}
}

// TestAttachNeedsTheModule: where the kernel has no NBD devices (this
// build machine), Attach says what to do.
func TestAttachNeedsTheModule(t *testing.T) {
	if _, err := os.Stat("/dev/nbd0"); err == nil {
		t.Skip("this kernel has /dev/nbd0; the test VM scenario covers a real attach")
	}
	srv := nbd.NewServer(newFileBackend(t, 1<<20), nbd.Options{})
	defer srv.Close()
	_, err := nbd.Attach("/dev/nbd0", srv, 4096)
	if err == nil || !contains(err.Error(), "modprobe nbd") {
		t.Fatalf("Attach without the module: %v, want an error naming modprobe nbd", err)
	}
}

// socketPair is a connected pair of unix sockets: buffered, unlike
// net.Pipe, as the kernel's socket is.
func socketPair(t *testing.T) (net.Conn, net.Conn) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM, 0)
	if err != nil {
		t.Fatal(err)
	}
	var conns [2]net.Conn
	for i, fd := range fds {
		f := os.NewFile(uintptr(fd), "pair")
		c, err := net.FileConn(f)
		f.Close()
		if err != nil {
			t.Fatal(err)
		}
		conns[i] = c
		t.Cleanup(func() { c.Close() })
	}
	return conns[0], conns[1]
}
