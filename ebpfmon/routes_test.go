package ebpfmon_test

import (
	"encoding/binary"
	"fmt"
	"os"
	"runtime"
	"sync/atomic"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// The attacks below reach the key pages by routes other than openat and a
// readable remote iovec: the legacy open(2) and creat(2) syscalls, an
// io_uring ring, perf_event_open without a pid, and a process_vm_readv
// whose remote iovecs sit on a page not yet faulted in. Each returns the
// syscall's error; start is called just before the attacking syscall.

// openLegacy opens path with open(2) (SYS_OPEN), or creat(2) when creat.
func openLegacy(path string, creat bool, start func()) error {
	p, err := unix.BytePtrFromString(path)
	if err != nil {
		return err
	}
	start()
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

// openRing opens path with an io_uring IORING_OP_OPENAT: a one-entry ring,
// set up by hand (x/sys has no io_uring helpers), no syscall but
// io_uring_enter doing the open.
func openRing(path string, start func()) error {
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
	start()
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

// perfWide opens a perf event that names no process: on CPU 0 for every
// task (pid -1), or, with cgroup, for every task of the root cgroup.
// The events sample user registers and stack, as a profiler that could
// catch key bytes would.
func perfWide(cgroup bool, start func()) error {
	attr := unix.PerfEventAttr{Type: unix.PERF_TYPE_SOFTWARE, Config: unix.PERF_COUNT_SW_CPU_CLOCK,
		Size: uint32(unsafe.Sizeof(unix.PerfEventAttr{})), Bits: unix.PerfBitDisabled, Sample: 1000,
		Sample_type: unix.PERF_SAMPLE_REGS_USER | unix.PERF_SAMPLE_STACK_USER, Sample_regs_user: 0xff, Sample_stack_user: 4096}
	pid, flags := -1, unix.PERF_FLAG_FD_CLOEXEC
	if cgroup {
		cg, err := unix.Open("/sys/fs/cgroup", unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
		if err != nil {
			return err
		}
		defer unix.Close(cg)
		pid, flags = cg, flags|unix.PERF_FLAG_PID_CGROUP
	}
	start()
	fd, err := unix.PerfEventOpen(&attr, pid, 0, -1, flags)
	if err == nil {
		unix.Close(fd)
	}
	return err
}

// readvLazy reads 64 bytes at addr of pid with process_vm_readv, its remote
// iovec on a private file mapping never touched before the call: the
// monitor's entry program cannot read it (it may not fault pages in), the
// kernel's copy faults it in.
func readvLazy(pid int, addr uint64, start func()) error {
	f, err := os.CreateTemp("", "iov")
	if err != nil {
		return err
	}
	defer os.Remove(f.Name())
	defer f.Close()
	iov := make([]byte, os.Getpagesize())
	binary.NativeEndian.PutUint64(iov[0:], addr)
	binary.NativeEndian.PutUint64(iov[8:], 64)
	if _, err := f.Write(iov); err != nil {
		return err
	}
	m, err := unix.Mmap(int(f.Fd()), 0, len(iov), unix.PROT_READ, unix.MAP_PRIVATE)
	if err != nil {
		return err
	}
	defer unix.Munmap(m)
	buf := make([]byte, 64)
	local := unix.Iovec{Base: &buf[0], Len: 64}
	start()
	_, _, errno := syscall.Syscall6(unix.SYS_PROCESS_VM_READV, uintptr(pid), uintptr(unsafe.Pointer(&local)), 1,
		uintptr(unsafe.Pointer(&m[0])), 1, 0)
	runtime.KeepAlive(buf)
	if errno != 0 {
		return errno
	}
	return nil
}
