// Command attack is the test guest's attacker (issue 6, scenario 4; issue
// 12): run as root inside the guest, it tries to reach a key holder's
// memory by every route the monitor watches — process_vm_readv/writev,
// ptrace attach and seize, pidfd_getfd, perf_event_open on the process and
// on a CPU, opens of /proc/PID/mem by openat, open, creat, openat2,
// io_uring and relative to a /proc/PID dirfd, of its environ and maps, of
// /proc/kcore and /dev/mem — then prints what the kernel answered, one
// "technique=RESULT" per word, for the host to check. The testvm tests build it statically and put it in the
// initramfs; busybox has no such tool. It also opens /proc/PID/mem and calls
// process_vm_readv through int 0x80, the 32-bit route that skips the
// kernel's per-syscall tracepoints (it dies with SIGSEGV in the CI sandbox,
// so only the guest runs it). `attack hold` is a stand-in key holder: it
// waits until killed.
//
// Root holds CAP_SYS_PTRACE, which overrides the key holder's
// PR_SET_DUMPABLE=0, and CAP_SYS_RAWIO, so without the BPF LSM every
// attempt would succeed: an EPERM here is the monitor's denial, and so is
// an EACCES for /proc/PID/mem (mem_open's mm_access turns the LSM's EPERM
// into EACCES). The perf_event_open, environ and maps words are READ-mode
// access, which deny mode reports and lets through ("ok").
package main

import (
	"errors"
	"fmt"
	"os"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/keygate/keygate/internal/openroute"
)

// textAddr is mapped in every static, non-PIE Go binary (keygate is one):
// the start of its text segment.
const textAddr = 0x401000

func main() {
	if len(os.Args) == 2 && os.Args[1] == "hold" {
		for {
			time.Sleep(time.Hour)
		}
	}
	// ptrace requests must come from the tracing thread.
	runtime.LockOSThread()
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: attack PID | attack hold")
		os.Exit(2)
	}
	pid, err := strconv.Atoi(os.Args[1])
	if err != nil || pid <= 0 {
		fmt.Fprintf(os.Stderr, "attack: %q is not a process ID\n", os.Args[1])
		os.Exit(2)
	}
	out := []string{
		"process_vm_readv=" + describe(processVMReadv(pid)),
		"proc_mem=" + describe(procMem(pid)),
		"ptrace_attach=" + describe(ptraceAttach(pid)),
		// The same open as a 32-bit syscall, which the monitor must see
		// on raw_syscalls:sys_exit.
		"proc_mem_int80=" + describe(procMemInt80(pid)),
		// Routes issue 12 moved onto the BPF LSM in deny mode.
		"process_vm_writev=" + describe(processVMWritev(pid)),
		"pidfd_getfd=" + describe(pidfdGetfd(pid)),
		"process_vm_readv_int80=" + describe(processVMReadvInt80(pid)),
		"perf_event_open=" + describe(perfEventOpen(pid, 0)),
		"perf_cpu=" + describe(perfEventOpen(-1, unix.PERF_SAMPLE_REGS_USER|unix.PERF_SAMPLE_STACK_USER)),
		// Every other route to /proc/PID/mem's open (deny mode sees them
		// all in ptrace_access_check, from mem_open), the READ-mode opens
		// of environ and maps, and the opens of all of memory (deny mode:
		// locked_down).
		"proc_mem_open=" + describe(openroute.Legacy(memPath(pid), false, nil)),
		"proc_mem_creat=" + describe(openroute.Legacy(memPath(pid), true, nil)),
		"proc_mem_openat2=" + describe(openat2(memPath(pid))),
		"proc_mem_io_uring=" + describe(openroute.Ring(memPath(pid), nil)),
		"proc_mem_dirfd=" + describe(openDirfd(fmt.Sprintf("/proc/%d", pid), "mem")),
		"proc_environ=" + describe(openClose(fmt.Sprintf("/proc/%d/environ", pid))),
		"proc_maps=" + describe(openClose(fmt.Sprintf("/proc/%d/maps", pid))),
		"kcore=" + describe(openClose("/proc/kcore")),
		"dev_mem=" + describe(openClose("/dev/mem")),
		// Last: a seize that succeeds lasts until this process exits.
		"ptrace_seize=" + describe(unix.PtraceSeize(pid)),
	}
	fmt.Println(strings.Join(out, " "))
}

func processVMReadv(pid int) error {
	buf := make([]byte, 4096)
	local := []unix.Iovec{{Base: &buf[0], Len: uint64(len(buf))}}
	remote := []unix.RemoteIovec{{Base: textAddr, Len: len(buf)}}
	_, err := unix.ProcessVMReadv(pid, local, remote, 0)
	return err
}

// processVMWritev writes 8 bytes at 0x1000, which no process maps: it
// harms nothing should the monitor fail to deny it.
func processVMWritev(pid int) error {
	buf := make([]byte, 8)
	local := []unix.Iovec{{Base: &buf[0], Len: uint64(len(buf))}}
	remote := []unix.RemoteIovec{{Base: 0x1000, Len: len(buf)}}
	_, err := unix.ProcessVMWritev(pid, local, remote, 0)
	return err
}

// pidfdGetfd takes a copy of the key holder's descriptor 0.
func pidfdGetfd(pid int) error {
	pfd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		return fmt.Errorf("pidfd_open: %w", err)
	}
	defer unix.Close(pfd)
	fd, err := unix.PidfdGetfd(pfd, 0, 0)
	if err != nil {
		return err
	}
	return unix.Close(fd)
}

// perfEventOpen opens a software CPU-clock event on pid (on CPU 0 for
// pid -1) sampling what sample names.
func perfEventOpen(pid int, sample uint64) error {
	attr := unix.PerfEventAttr{Type: unix.PERF_TYPE_SOFTWARE, Config: unix.PERF_COUNT_SW_CPU_CLOCK,
		Size: uint32(unsafe.Sizeof(unix.PerfEventAttr{})), Bits: unix.PerfBitDisabled, Sample: 1000,
		Sample_type: sample, Sample_regs_user: 0xff, Sample_stack_user: 4096}
	cpu := -1
	if pid == -1 {
		cpu = 0
	}
	fd, err := unix.PerfEventOpen(&attr, pid, cpu, -1, unix.PERF_FLAG_FD_CLOEXEC)
	if err != nil {
		return err
	}
	return unix.Close(fd)
}

func procMem(pid int) error {
	f, err := os.Open(fmt.Sprintf("/proc/%d/mem", pid))
	if err != nil {
		return err
	}
	defer f.Close()
	_, err = f.ReadAt(make([]byte, 4096), textAddr)
	return err
}

func memPath(pid int) string { return fmt.Sprintf("/proc/%d/mem", pid) }

// openClose opens path with openat(AT_FDCWD, path, O_RDONLY|O_CLOEXEC) and
// closes it, reading nothing.
func openClose(path string) error {
	return openDirfd("", path)
}

// openDirfd opens name relative to the directory dir (the working
// directory when dir is empty) with openat, and closes it.
func openDirfd(dir, name string) error {
	dfd := unix.AT_FDCWD
	if dir != "" {
		d, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
		if err != nil {
			return fmt.Errorf("open %s: %w", dir, err)
		}
		defer unix.Close(d)
		dfd = d
	}
	fd, err := unix.Openat(dfd, name, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	return unix.Close(fd)
}

func openat2(path string) error {
	fd, err := unix.Openat2(unix.AT_FDCWD, path, &unix.OpenHow{Flags: unix.O_RDONLY | unix.O_CLOEXEC})
	if err != nil {
		return err
	}
	return unix.Close(fd)
}

func ptraceAttach(pid int) error {
	if err := syscall.PtraceAttach(pid); err != nil {
		return err
	}
	// Let the key holder go on: a successful attack must not also hang
	// the test.
	var ws syscall.WaitStatus
	syscall.Wait4(pid, &ws, syscall.WALL, nil)
	return syscall.PtraceDetach(pid)
}

// describe names the errno the kernel returned ("EPERM"), or "ok".
func describe(err error) string {
	if err == nil {
		return "ok"
	}
	var errno syscall.Errno
	if !errors.As(err, &errno) {
		return "error:" + strings.ReplaceAll(err.Error(), " ", "_")
	}
	switch errno {
	case syscall.EPERM:
		return "EPERM"
	case syscall.EACCES:
		return "EACCES"
	case syscall.ESRCH:
		return "ESRCH"
	case syscall.EFAULT:
		return "EFAULT"
	case syscall.EIO:
		return "EIO"
	}
	return "errno" + strconv.Itoa(int(errno))
}
