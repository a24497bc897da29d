package boot

import (
	"sync"

	"golang.org/x/sys/unix"
)

var (
	secretOnce sync.Once
	secretOK   bool
)

// memfdSecret probes memfd_secret(2) once (it needs Linux 5.14 and
// secretmem enabled; secretmem.enable=1 on some kernels).
func memfdSecret() bool {
	secretOnce.Do(func() {
		fd, _, errno := unix.Syscall(unix.SYS_MEMFD_SECRET, 0, 0, 0)
		if errno == 0 {
			unix.Close(int(fd))
			secretOK = true
		}
	})
	return secretOK
}

// MemoryProtection says, for the console at start, what holds the keys:
// memguard's locked, guarded, non-dumpable pages. Whether the kernel offers
// memfd_secret is reported too, but disk/xts keeps the round keys in
// memguard pages either way, so memfd_secret is never claimed as in force.
func MemoryProtection() string {
	if memfdSecret() {
		return "memguard (mlock'd, guard pages, MADV_DONTDUMP); memfd_secret is available in this kernel but not used for keys yet"
	}
	return "memguard (mlock'd, guard pages, MADV_DONTDUMP); memfd_secret is not available in this kernel"
}
