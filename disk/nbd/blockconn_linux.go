package nbd

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// blockingConn is the server's end of a socket pair given to the kernel's
// NBD device, read and written with blocking system calls instead of Go's
// network poller.
//
// Why: at queue depth 1 (a 4 KiB read the kernel waits for) a request
// through the poller costs a wakeup of the thread in epoll_pwait, which
// readies the reader's goroutine, and, when that thread is not the one
// that runs it, a futex wakeup of another; in the one-vCPU test VM under
// TCG each of these is a context switch, and the profile of 4 KiB random
// reads showed the runtime's scheduling (schedule, findRunnable, netpoll,
// sysmon) as large as keygate's pread of the disk. A thread blocked in
// read(2) is woken by the kernel's send directly and, with the request
// served on it (transmit's inline path), goes back to read(2): two waits
// per request, for the socket and for the disk.
//
// The cost of a blocking read is a P held by the reader's thread while it
// waits; Attach therefore runs with more Ps (minProcs).
type blockingConn struct {
	f    *os.File
	fd   int
	once sync.Once
}

// newBlockingConn takes fd, a connected stream socket, in blocking mode.
func newBlockingConn(fd int) (*blockingConn, error) {
	if err := unix.SetNonblock(fd, false); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("set the socket blocking: %w", err)
	}
	// os.File of a blocking descriptor: not registered with the poller,
	// and its Close defers the close(2) until a blocked read returns, so
	// the descriptor's number is never reused under a reader.
	return &blockingConn{f: os.NewFile(uintptr(fd), "nbd-server"), fd: fd}, nil
}

func (c *blockingConn) Read(p []byte) (int, error) {
	for {
		n, err := unix.Read(c.fd, p)
		switch {
		case err == unix.EINTR:
			continue
		case err != nil:
			return 0, &net.OpError{Op: "read", Net: "unix", Err: err}
		case n == 0 && len(p) > 0:
			return 0, io.EOF
		}
		return n, nil
	}
}

func (c *blockingConn) Write(p []byte) (int, error) {
	return c.writev([][]byte{p})
}

// writev sends every byte of bufs, with as few writev(2) as the socket
// allows (one, for a reply that fits its send buffer), and consumes bufs.
func (c *blockingConn) writev(bufs [][]byte) (int, error) {
	total := 0
	for len(bufs) > 0 {
		n, err := unix.Writev(c.fd, bufs)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return total, &net.OpError{Op: "writev", Net: "unix", Err: err}
		}
		total += n
		for n > 0 && len(bufs) > 0 {
			if n < len(bufs[0]) {
				bufs[0] = bufs[0][n:]
				n = 0
				break
			}
			n -= len(bufs[0])
			bufs = bufs[1:]
		}
		for len(bufs) > 0 && len(bufs[0]) == 0 {
			bufs = bufs[1:]
		}
	}
	return total, nil
}

// Close shuts the socket down, which wakes a reader blocked in read(2)
// (close(2) alone would not), then closes it.
func (c *blockingConn) Close() error {
	err := net.ErrClosed
	c.once.Do(func() {
		unix.Shutdown(c.fd, unix.SHUT_RDWR)
		err = c.f.Close()
	})
	return err
}

// The transmission phase sets no deadlines and asks no addresses; these
// complete net.Conn.
var errNoDeadline = errors.New("nbd: a kernel socket takes no deadline")

func (c *blockingConn) LocalAddr() net.Addr              { return &net.UnixAddr{Net: "unix"} }
func (c *blockingConn) RemoteAddr() net.Addr             { return &net.UnixAddr{Net: "unix"} }
func (c *blockingConn) SetDeadline(time.Time) error      { return errNoDeadline }
func (c *blockingConn) SetReadDeadline(time.Time) error  { return errNoDeadline }
func (c *blockingConn) SetWriteDeadline(time.Time) error { return errNoDeadline }
