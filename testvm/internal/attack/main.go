// Command attack is the test guest's attacker (issue 6, scenario 4): run as
// root inside the guest, it tries to read a key holder's memory the three
// ways the monitor must deny — process_vm_readv, /proc/PID/mem and ptrace
// attach — and prints what the kernel answered, one "technique=RESULT" per
// word, for the host to check. The testvm tests build it statically and put
// it in the initramfs; busybox has no such tool. It also opens
// /proc/PID/mem through int 0x80, the 32-bit route that skips the kernel's
// per-syscall tracepoints (it dies with SIGSEGV in the CI sandbox, so only
// the guest runs it).
//
// Root holds CAP_SYS_PTRACE, which overrides the key holder's
// PR_SET_DUMPABLE=0, so without the BPF LSM every attempt would succeed:
// an EPERM here is the monitor's denial.
package main

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// textAddr is mapped in every static, non-PIE Go binary (keygate is one):
// the start of its text segment.
const textAddr = 0x401000

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: attack PID")
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

func procMem(pid int) error {
	f, err := os.Open(fmt.Sprintf("/proc/%d/mem", pid))
	if err != nil {
		return err
	}
	defer f.Close()
	_, err = f.ReadAt(make([]byte, 4096), textAddr)
	return err
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
