package nbd

import (
	"errors"
	"fmt"
	"net"
	"os"
	"sync"
	"syscall"
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
	// f owns the descriptor: every read and write holds a reference to it,
	// so a Close under way never closes a number another thread is still
	// using (or would reuse after another open took it).
	f    *os.File
	rc   syscall.RawConn
	once sync.Once
}

// newBlockingConn takes fd, a connected stream socket, in blocking mode.
func newBlockingConn(fd int) (*blockingConn, error) {
	if err := unix.SetNonblock(fd, false); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("set the socket blocking: %w", err)
	}
	// os.File of a blocking descriptor: not registered with the poller,
	// its reads block in read(2), and its Close defers the close(2) until
	// a blocked read returns.
	f := os.NewFile(uintptr(fd), "nbd-server")
	rc, err := f.SyscallConn()
	if err != nil {
		f.Close()
		return nil, err
	}
	return &blockingConn{f: f, rc: rc}, nil
}

// Read is one read(2) (EOF when the peer has closed).
func (c *blockingConn) Read(p []byte) (int, error) {
	return c.f.Read(p)
}

func (c *blockingConn) Write(p []byte) (int, error) {
	return c.writev([][]byte{p})
}

// writev sends every byte of bufs, with as few writev(2) as the socket
// allows (one, for a reply that fits its send buffer), and consumes bufs.
func (c *blockingConn) writev(bufs [][]byte) (int, error) {
	total := 0
	var werr error
	err := c.rc.Write(func(fd uintptr) bool {
		for len(bufs) > 0 {
			n, err := unix.Writev(int(fd), bufs)
			if err == unix.EINTR {
				continue
			}
			if err != nil {
				werr = err
				return true
			}
			total += n
			for len(bufs) > 0 && n >= len(bufs[0]) {
				n -= len(bufs[0])
				bufs = bufs[1:]
			}
			if n > 0 {
				bufs[0] = bufs[0][n:]
			}
		}
		return true
	})
	if err == nil {
		err = werr
	}
	if err != nil {
		return total, &net.OpError{Op: "writev", Net: "unix", Err: err}
	}
	return total, nil
}

// Close shuts the socket down, which wakes a reader blocked in read(2)
// (close(2) alone would not), then closes it.
func (c *blockingConn) Close() error {
	err := net.ErrClosed
	c.once.Do(func() {
		c.rc.Control(func(fd uintptr) { unix.Shutdown(int(fd), unix.SHUT_RDWR) })
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
