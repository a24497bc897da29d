// Package openroute opens files by the routes to the kernel's open path
// that bypass openat(2): the legacy open(2) and creat(2) syscalls and an
// io_uring ring. The monitor's tests use it to open /proc/PID/mem and the
// like by each route: ebpfmon's on the host (detect mode) and the test
// VM's attacker (testvm/internal/attack, deny mode). Each function returns
// the error the kernel gave the open.
package openroute

import (
	"encoding/binary"
	"fmt"
	"runtime"
	"sync/atomic"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Legacy opens path with open(2) (SYS_OPEN), or creat(2) when creat, and
// closes it. start, if not nil, is called just before the syscall.
func Legacy(path string, creat bool, start func()) error {
	p, err := unix.BytePtrFromString(path)
	if err != nil {
		return err
	}
	if start != nil {
		start()
	}
	var fd uintptr
	var errno syscall.Errno
	if creat {
		fd, _, errno = syscall.Syscall(syscall.SYS_CREAT, uintptr(unsafe.Pointer(p)), 0o600, 0)
	} else {
		fd, _, errno = syscall.Syscall(syscall.SYS_OPEN, uintptr(unsafe.Pointer(p)), unix.O_RDONLY|unix.O_CLOEXEC, 0)
	}
	runtime.KeepAlive(p)
	if errno != 0 {
		return errno
	}
	unix.Close(int(fd))
	return nil
}

// ioUringParams is struct io_uring_params (include/uapi/linux/io_uring.h).
type ioUringParams struct {
	SQEntries, CQEntries, Flags, SQThreadCPU, SQThreadIdle, Features, WQFd uint32
	Resv                                                                   [3]uint32
	SQOff                                                                  struct {
		Head, Tail, RingMask, RingEntries, Flags, Dropped, Array, Resv1 uint32
		UserAddr                                                        uint64
	}
	CQOff struct {
		Head, Tail, RingMask, RingEntries, Overflow, CQEs, Flags, Resv1 uint32
		UserAddr                                                        uint64
	}
}

// Ring opens path with an io_uring IORING_OP_OPENAT and closes it: a one-entry ring,
// set up by hand (x/sys has no io_uring helpers), no syscall but
// io_uring_enter doing the open.
func Ring(path string, start func()) error {
	const (
		opOpenat       = 18
		offSQEs        = 0x10000000
		enterGetEvents = 1
		featSingleMmap = 1
	)
	var p ioUringParams
	rfd, _, errno := syscall.Syscall(unix.SYS_IO_URING_SETUP, 1, uintptr(unsafe.Pointer(&p)), 0)
	if errno != 0 {
		return fmt.Errorf("io_uring_setup: %w", errno)
	}
	fd := int(rfd)
	defer unix.Close(fd)
	if p.Features&featSingleMmap == 0 {
		return fmt.Errorf("io_uring without IORING_FEAT_SINGLE_MMAP")
	}
	size := max(p.SQOff.Array+p.SQEntries*4, p.CQOff.CQEs+p.CQEntries*16)
	ring, err := unix.Mmap(fd, 0, int(size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE)
	if err != nil {
		return fmt.Errorf("mmap the rings: %w", err)
	}
	defer unix.Munmap(ring)
	sqes, err := unix.Mmap(fd, offSQEs, int(p.SQEntries)*64, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE)
	if err != nil {
		return fmt.Errorf("mmap the SQEs: %w", err)
	}
	defer unix.Munmap(sqes)
	name, err := unix.BytePtrFromString(path)
	if err != nil {
		return err
	}
	u32 := func(b []byte, off uint32) *uint32 { return (*uint32)(unsafe.Pointer(&b[off])) }
	sqe := sqes[:64]
	clear(sqe)
	sqe[0] = opOpenat
	dfd := int32(unix.AT_FDCWD)
	binary.NativeEndian.PutUint32(sqe[4:], uint32(dfd))
	binary.NativeEndian.PutUint64(sqe[16:], uint64(uintptr(unsafe.Pointer(name))))
	binary.NativeEndian.PutUint32(sqe[28:], unix.O_RDONLY|unix.O_CLOEXEC)
	tail := atomic.LoadUint32(u32(ring, p.SQOff.Tail))
	*u32(ring, p.SQOff.Array+(tail&*u32(ring, p.SQOff.RingMask))*4) = 0
	atomic.StoreUint32(u32(ring, p.SQOff.Tail), tail+1)
	if start != nil {
		start()
	}
	_, _, errno = syscall.Syscall6(unix.SYS_IO_URING_ENTER, rfd, 1, 1, enterGetEvents, 0, 0)
	runtime.KeepAlive(name)
	if errno != 0 {
		return fmt.Errorf("io_uring_enter: %w", errno)
	}
	head := atomic.LoadUint32(u32(ring, p.CQOff.Head))
	cqe := p.CQOff.CQEs + (head&*u32(ring, p.CQOff.RingMask))*16
	res := int32(binary.NativeEndian.Uint32(ring[cqe+8:]))
	atomic.StoreUint32(u32(ring, p.CQOff.Head), head+1)
	if res < 0 {
		return syscall.Errno(-res)
	}
	unix.Close(int(res))
	return nil
}
