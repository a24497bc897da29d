//go:build !amd64

package main

import "syscall"

// procMemInt80 needs x86's int 0x80.
func procMemInt80(int) error { return syscall.ENOSYS }

// processVMReadvInt80 needs x86's int 0x80.
func processVMReadvInt80(int) error { return syscall.ENOSYS }
