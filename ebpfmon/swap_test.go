package ebpfmon_test

import (
	"fmt"
	"os"
	"strconv"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/keygate/keygate/ebpfmon"
)

// userfaultfd(2)'s ioctls, as <linux/userfaultfd.h> numbers them.
const (
	uffdioAPI      = 0xC018AA3F
	uffdioRegister = 0xC020AA00
	uffdioCopy     = 0xC028AA03
)

// uffdPage maps one fresh anonymous page registered with a new userfaultfd
// for missing pages: the first access to it, the kernel's included, waits
// until the returned fd serves it (uffdServe).
func uffdPage() (int, []byte, error) {
	fd, _, errno := unix.Syscall(unix.SYS_USERFAULTFD, unix.O_CLOEXEC, 0, 0)
	if errno != 0 {
		return -1, nil, fmt.Errorf("userfaultfd: %v", errno)
	}
	api := struct{ api, features, ioctls uint64 }{api: 0xAA}
	if _, _, errno := unix.Syscall(unix.SYS_IOCTL, fd, uffdioAPI, uintptr(unsafe.Pointer(&api))); errno != 0 {
		return -1, nil, fmt.Errorf("UFFDIO_API: %v", errno)
	}
	page := os.Getpagesize()
	p, err := unix.Mmap(-1, 0, page, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		return -1, nil, err
	}
	reg := struct{ start, len, mode, ioctls uint64 }{start: uint64(uintptr(unsafe.Pointer(&p[0]))), len: uint64(page), mode: 1}
	if _, _, errno := unix.Syscall(unix.SYS_IOCTL, fd, uffdioRegister, uintptr(unsafe.Pointer(&reg))); errno != 0 {
		return -1, nil, fmt.Errorf("UFFDIO_REGISTER: %v", errno)
	}
	return int(fd), p, nil
}

// uffdWait waits for the first fault on fd's page.
func uffdWait(fd int) error {
	msg := make([]byte, 32)
	if _, err := unix.Read(fd, msg); err != nil {
		return fmt.Errorf("read userfaultfd: %v", err)
	}
	return nil
}

// uffdFill fills fd's page p with src, which lets the faulting access go on.
func uffdFill(fd int, p, src []byte) error {
	cp := struct {
		dst, src, len, mode uint64
		copied              int64
	}{dst: uint64(uintptr(unsafe.Pointer(&p[0]))), src: uint64(uintptr(unsafe.Pointer(&src[0]))), len: uint64(len(p))}
	if _, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), uffdioCopy, uintptr(unsafe.Pointer(&cp))); errno != 0 {
		return fmt.Errorf("UFFDIO_COPY: %v", errno)
	}
	return nil
}

// readvSwapped reads 64 bytes at key from pid with process_vm_readv while
// its remote iovec names the harmless address other both when the syscall
// is entered and when it returns. No race is run: userfaultfd stops the
// kernel twice inside the call, first as it copies the local iovec array
// (which it does before it copies the remote one), where the remote iovec
// is pointed at the key, then as it writes the first byte read into the
// local buffer (after it copied the remote iovec), where it is pointed
// back. It prints "read N nonzero B": the bytes read, and whether any was
// non-zero (the victim's key is random).
func readvSwapped(pid int, key, other uint64, start func()) error {
	fdVec, lvec, err := uffdPage()
	if err != nil {
		return err
	}
	fdBuf, buf, err := uffdPage()
	if err != nil {
		return err
	}
	rvec := &unix.RemoteIovec{Base: uintptr(other), Len: 64}
	vecSrc := make([]byte, len(lvec))
	*(*unix.Iovec)(unsafe.Pointer(&vecSrc[0])) = unix.Iovec{Base: &buf[0], Len: 64}
	handled := make(chan error, 1)
	go func() {
		handled <- func() error {
			if err := uffdWait(fdVec); err != nil {
				return err
			}
			rvec.Base = uintptr(key)
			if err := uffdFill(fdVec, lvec, vecSrc); err != nil {
				return err
			}
			if err := uffdWait(fdBuf); err != nil {
				return err
			}
			rvec.Base = uintptr(other)
			return uffdFill(fdBuf, buf, make([]byte, len(buf)))
		}()
	}()
	start()
	n, _, errno := unix.Syscall6(unix.SYS_PROCESS_VM_READV, uintptr(pid), uintptr(unsafe.Pointer(&lvec[0])), 1,
		uintptr(unsafe.Pointer(rvec)), 1, 0)
	if err := <-handled; err != nil {
		return err
	}
	if errno != 0 {
		return errno
	}
	nonzero := false
	for _, b := range buf[:64] {
		nonzero = nonzero || b != 0
	}
	fmt.Printf("read %d nonzero %v\n", n, nonzero)
	return nil
}

// TestReadvSwappedMidCall: detect mode judges process_vm_readv's remote
// iovecs from the caller's memory at entry and at exit; the kernel copies
// them in between, and userfaultfd lets the caller stop the kernel there
// and rewrite them at will, with no race to win. So detect mode cannot
// tell from the ranges whether the key pages were read, and a successful
// process_vm_readv or writev of a protected process is critical there
// whatever ranges it showed (it needs CAP_SYS_PTRACE against keygate boot,
// which is not dumpable: no benign caller). Deny mode judges and refuses
// in the kernel's own check.
func TestReadvSwappedMidCall(t *testing.T) {
	m := startMonitor(t, ebpfmon.Config{DetectOnly: true})
	v := startVictim(t)
	if err := m.Protect(v.PID, []ebpfmon.Range{v.Key}); err != nil {
		t.Fatal(err)
	}
	atk := runAttack(t, "vm_readv_swapped", strconv.Itoa(v.PID), fmt.Sprintf("%#x", v.Key.Start), fmt.Sprintf("%#x", v.Other))
	if atk.Err != "" {
		t.Fatalf("the attack failed: %s", atk.Err)
	}
	if !atk.ReadNonzero {
		t.Fatalf("the attacker's read returned no key bytes: the swap did not happen as planned")
	}
	e := waitEvent(t, m, atk.PID, func(e ebpfmon.Event) bool { return e.Technique == ebpfmon.ProcessVMReadv })
	t.Logf("%s (iov_changed %v)", e, e.IovChanged)
	if e.Result != 64 {
		t.Errorf("result %d, want 64 bytes read", e.Result)
	}
	if e.Severity != ebpfmon.Critical {
		t.Errorf("a read of the key with its remote iovec swapped mid-call is %s, want critical", e.Severity)
	}
}
