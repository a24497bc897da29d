package main

import (
	"encoding/binary"
	"fmt"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

func int80(nr, a1, a2, a3 uintptr) uintptr

func int80x6(nr, a1, a2, a3, a4, a5, a6 uintptr) uintptr

// procMemInt80 opens /proc/PID/mem with the 32-bit open(2) (ia32 number 5)
// through int 0x80, which any 64-bit process may issue and which skips the
// kernel's per-syscall tracepoints. A 32-bit syscall takes 32-bit
// pointers, so the path lives in a MAP_32BIT mapping.
func procMemInt80(pid int) error {
	low, err := unix.Mmap(-1, 0, 4096, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_32BIT)
	if err != nil {
		return fmt.Errorf("mmap below 4 GiB: %w", err)
	}
	defer unix.Munmap(low)
	copy(low, fmt.Sprintf("/proc/%d/mem\x00", pid))
	const ia32Open, ia32Close = 5, 6
	r := int32(int80(ia32Open, uintptr(unsafe.Pointer(&low[0])), unix.O_RDONLY, 0))
	if r < 0 {
		return syscall.Errno(-r)
	}
	int80(ia32Close, uintptr(r), 0, 0)
	return nil
}

// processVMReadvInt80 reads 64 bytes at textAddr with the 32-bit
// process_vm_readv (ia32 number 347), whose iovecs are struct compat_iovec
// (two u32s), all in a MAP_32BIT mapping: the local iovec at 0, the remote
// one at 8, the buffer at 256.
func processVMReadvInt80(pid int) error {
	low, err := unix.Mmap(-1, 0, 4096, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_32BIT)
	if err != nil {
		return fmt.Errorf("mmap below 4 GiB: %w", err)
	}
	defer unix.Munmap(low)
	base := uint32(uintptr(unsafe.Pointer(&low[0])))
	binary.NativeEndian.PutUint32(low[0:], base+256)
	binary.NativeEndian.PutUint32(low[4:], 64)
	binary.NativeEndian.PutUint32(low[8:], textAddr)
	binary.NativeEndian.PutUint32(low[12:], 64)
	const ia32ProcessVMReadv = 347
	r := int32(int80x6(ia32ProcessVMReadv, uintptr(pid), uintptr(base), 1, uintptr(base+8), 1, 0))
	if r < 0 {
		return syscall.Errno(-r)
	}
	return nil
}
