package nbd

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// The kernel's NBD ioctls (linux/nbd.h): _IO(0xab, n).
const (
	ioctlSetSock       = 0xab00
	ioctlSetBlksize    = 0xab01
	ioctlDoIt          = 0xab03
	ioctlClearSock     = 0xab04
	ioctlSetSizeBlocks = 0xab07
	ioctlDisconnect    = 0xab08
	ioctlSetFlags      = 0xab0a
)

// ErrAttached means the NBD device is already connected to something.
var ErrAttached = errors.New("the NBD device is already in use")

// Attachment is a kernel NBD device (/dev/nbdN) connected to a Server.
type Attachment struct {
	dev  *os.File
	dead chan struct{} // closed when NBD_DO_IT returns
	err  error         // what it returned
	once sync.Once
}

// Attach connects the kernel's NBD device at path to s, with the given
// logical block size (the volume's sector size), through socket pairs: the
// kernel gets one end of each already negotiated (NBD_SET_SOCK) and s
// serves the other with no handshake. The device can be mounted once
// Attach returns.
//
// It gives the kernel one connection. AttachConns gives it more (the
// export advertises NBD_FLAG_CAN_MULTI_CONN, so the kernel makes one
// hardware queue per connection, each CPU sends on its own socket and each
// socket has its own receiving thread), but no test has run more than one
// yet: the test VM has one vCPU. Attach takes the path that has run.
//
// The threads that serve the kernel must not wait on the kernel's own
// writeback to this device when they allocate memory, or the two deadlock
// under memory pressure; they must be marked PR_SET_IO_FLUSHER. Attach
// marks every thread of the process (see ioFlusherProcess), so that
// requests are served by ordinary goroutines; where that is refused (a
// binary that links cgo) it serves the kernel on threads of its own, each
// marked, which costs a handoff between threads per request.
//
// It needs root and the nbd module (modprobe nbd).
func Attach(path string, s *Server, blockSize uint32) (*Attachment, error) {
	return AttachConns(path, s, blockSize, 1)
}

// maxAttachConns bounds AttachConns: past a few, more sockets only add
// receiving threads.
const maxAttachConns = 8

// AttachConns is Attach with n connections (1 to maxAttachConns). The server
// advertises NBD_FLAG_CAN_MULTI_CONN, without which the kernel would refuse
// more than one.
func AttachConns(path string, s *Server, blockSize uint32, n int) (*Attachment, error) {
	if blockSize == 0 || s.size%int64(blockSize) != 0 {
		return nil, fmt.Errorf("attach %s: export size %d is not a multiple of the block size %d", path, s.size, blockSize)
	}
	n = min(max(n, 1), maxAttachConns)
	// A device in use must not be touched at all: NBD_SET_SIZE on it
	// would resize a live disk. Its pid file exists while it runs.
	sys := filepath.Join("/sys/block", filepath.Base(path))
	if _, err := os.Stat(filepath.Join(sys, "pid")); err == nil {
		return nil, fmt.Errorf("attach %s: %w: pick another /dev/nbdN", path, ErrAttached)
	}
	dev, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return nil, fmt.Errorf("attach %s: %w (is the nbd module loaded? modprobe nbd)", path, err)
	}
	// The kernel takes every socket of a device set up by ioctl from one
	// task (a thread: "Device being setup by another task" otherwise).
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	fd := dev.Fd()
	var serverEnds []net.Conn
	fail := func(err error) (*Attachment, error) {
		for _, c := range serverEnds {
			c.Close()
		}
		if len(serverEnds) > 0 {
			unix.Syscall(unix.SYS_IOCTL, fd, ioctlClearSock, 0) // ours, set below
		}
		dev.Close()
		return nil, fmt.Errorf("attach %s: %w", path, err)
	}
	for range n {
		c, err := kernelSocket(fd)
		if err != nil {
			if len(serverEnds) == 0 && errors.Is(err, unix.EBUSY) {
				// The first socket is what fails on a device someone
				// set up since the check above, before anything of
				// theirs is changed.
				err = fmt.Errorf("%w (%w): pick another /dev/nbdN", ErrAttached, err)
			}
			return fail(err)
		}
		serverEnds = append(serverEnds, c)
	}
	steps := []struct {
		name string
		req  uint
		arg  uintptr
	}{
		{"NBD_SET_BLKSIZE", ioctlSetBlksize, uintptr(blockSize)},
		{"NBD_SET_SIZE_BLOCKS", ioctlSetSizeBlocks, uintptr(s.size / int64(blockSize))},
		{"NBD_SET_FLAGS", ioctlSetFlags, uintptr(s.flags)},
	}
	for _, st := range steps {
		if err := ioctl(fd, st.req, st.arg); err != nil {
			return fail(fmt.Errorf("%s: %w", st.name, err))
		}
	}
	tuneQueue(path, s.log)
	spareProc(s.log)
	a := &Attachment{dev: dev, dead: make(chan struct{})}
	threadInit := ioFlusher
	if err := ioFlusherProcess(); err == nil {
		threadInit = nil
	} else {
		s.log.Info("nbd: serving the kernel on dedicated threads", "reason", err)
	}
	for _, c := range serverEnds {
		go s.serve(c, false, threadInit)
	}
	go func() {
		// NBD_DO_IT runs the device until it is disconnected; it blocks
		// this thread, so keep the goroutine on it.
		runtime.LockOSThread()
		err := ioctl(fd, ioctlDoIt, 0)
		unix.Syscall(unix.SYS_IOCTL, fd, ioctlClearSock, 0)
		a.err = err
		close(a.dead)
	}()
	// The device has its size, and can be mounted, only once the kernel
	// runs it (its pid file appears); return no earlier.
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		select {
		case <-a.dead:
			a.dev.Close()
			return nil, fmt.Errorf("attach %s: the kernel stopped the device at once: %v", path, a.err)
		default:
		}
		if _, err := os.Stat(filepath.Join(sys, "pid")); err == nil {
			return a, nil
		}
		if time.Now().After(deadline) {
			a.Close()
			return nil, fmt.Errorf("attach %s: the kernel did not start the device within 10 s", path)
		}
	}
}

// kernelSocket makes a socket pair, gives one end to the NBD device fd
// (NBD_SET_SOCK) and returns the other.
func kernelSocket(fd uintptr) (net.Conn, error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("socketpair: %w", err)
	}
	kernelEnd := os.NewFile(uintptr(fds[0]), "nbd-kernel")
	defer kernelEnd.Close() // the kernel holds its own reference once set
	serverEnd, err := newBlockingConn(fds[1])
	if err != nil {
		return nil, err
	}
	if err := ioctl(fd, ioctlSetSock, kernelEnd.Fd()); err != nil {
		serverEnd.Close()
		return nil, fmt.Errorf("NBD_SET_SOCK: %w", err)
	}
	return serverEnd, nil
}

// Done is closed when the kernel lets go of the device: after Close, or on
// its own (the server failed, or someone ran nbd-client -d).
func (a *Attachment) Done() <-chan struct{} { return a.dead }

// Err is why the device stopped, once Done is closed.
func (a *Attachment) Err() error {
	<-a.dead
	return a.err
}

// Close disconnects the device (the kernel fails I/O still queued) and
// waits until the kernel has let go of it.
func (a *Attachment) Close() error {
	var err error
	a.once.Do(func() {
		if e := ioctl(a.dev.Fd(), ioctlDisconnect, 0); e != nil {
			err = fmt.Errorf("detach: NBD_DISCONNECT: %w", e)
		}
		<-a.dead // DO_IT returns once the device is down
		a.dev.Close()
	})
	return err
}

// ioFlusherProcess marks every thread of the process PR_SET_IO_FLUSHER, and
// with them every thread started later (a new thread inherits its
// creator's flag). Any goroutine may then serve the kernel's device, with
// none of the handoffs between locked threads that per-thread marking
// needs (each request woke two locked threads: on the host, 4 KiB reads at
// queue depth 1 ran 4-13x slower that way, with 4-8x the futex calls). The whole
// process is keygate serving a block device, so no thread of it may wait
// on that device's writeback anyway. It fails (ENOTSUP) in a binary that
// links cgo, whose C threads Go cannot reach, and without CAP_SYS_RESOURCE.
func ioFlusherProcess() error {
	if _, _, e := syscall.AllThreadsSyscall(unix.SYS_PRCTL, unix.PR_SET_IO_FLUSHER, 1, 0); e != 0 {
		return fmt.Errorf("prctl PR_SET_IO_FLUSHER on every thread: %w", e)
	}
	return nil
}

// minProcs is the fewest Ps (GOMAXPROCS) a process serving the kernel's
// device runs with: one held by the reader of the kernel's socket while it
// waits in read(2) (blockingConn), one for a request blocked in the
// backend's pread or pwrite, and others, so that a request handed to a
// goroutine finds a free P at once rather than after the runtime's
// monitor takes one back (20 µs to 10 ms). Idle Ps cost nothing.
const minProcs = 4

// spareProc raises GOMAXPROCS to minProcs, unless the environment sets it.
// On a one-vCPU VM Go runs one P, and each request's pread of the virtual
// disk holds it in a system call: the runtime's monitor (sysmon) then takes
// the P back on every request, wakes another thread to poll the network,
// and checks every 20 microseconds while the read waits, since it sees no
// idle P. In the test VM (one vCPU under TCG) that was most of keygate's
// CPU time: 4 KiB random reads cost 3.7 ms of vCPU in keygate each with one
// P and 1.8 ms with two, and ran at 2.8x the rate. A second P costs
// nothing while idle; the XTS workers stay within the CPU count.
func spareProc(log *slog.Logger) {
	if os.Getenv("GOMAXPROCS") != "" {
		return
	}
	if n := runtime.GOMAXPROCS(0); n < minProcs {
		runtime.GOMAXPROCS(minProcs)
		log.Info("nbd: GOMAXPROCS raised so that a request waiting for the disk does not hold the only P", "from", n, "to", minProcs)
	}
}

// queueKB is the read-ahead and largest request the attached device is
// given. The nbd driver defaults both to 128 KiB, so a sequential read
// costs a round trip to this process every 128 KiB; at 1 MiB, ext4 on the
// device read 0.44x of dm-crypt in the test VM instead of 0.27-0.37x (and
// raising only the request size changed nothing).
const queueKB = 1024

// tuneQueue sets the device's read-ahead and request size through sysfs.
// It is a tuning: a kernel that refuses it still serves, and says so.
func tuneQueue(path string, log *slog.Logger) {
	q := filepath.Join("/sys/block", filepath.Base(path), "queue")
	for _, f := range []string{"max_sectors_kb", "read_ahead_kb"} {
		if err := os.WriteFile(filepath.Join(q, f), []byte(strconv.Itoa(queueKB)), 0); err != nil {
			log.Warn("nbd: could not tune the device queue; it keeps the kernel's default", "file", f, "err", err)
		}
	}
}

func ioctl(fd uintptr, req uint, arg uintptr) error {
	if _, _, e := unix.Syscall(unix.SYS_IOCTL, fd, uintptr(req), arg); e != 0 {
		return e
	}
	return nil
}

// ioFlusher marks the calling thread PR_SET_IO_FLUSHER: the kernel then
// does not make its allocations wait on writeback (which, for a thread
// that serves a block device, would be writeback to itself).
func ioFlusher() error {
	if err := unix.Prctl(unix.PR_SET_IO_FLUSHER, 1, 0, 0, 0); err != nil {
		return fmt.Errorf("prctl PR_SET_IO_FLUSHER: %w", err)
	}
	return nil
}
