package ebpfmon_test

import (
	"encoding/binary"
	"os"
	"runtime"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// The attacks below reach the key pages by routes other than a pid-named
// syscall with a readable remote iovec: perf_event_open without a pid, and
// a process_vm_readv whose remote iovecs sit on a page not yet faulted in.
// The opens by the legacy open(2) and creat(2) syscalls and by io_uring
// are internal/openroute's, shared with the test VM's attacker. Each
// returns the syscall's error; start is called just before the attacking
// syscall.

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
