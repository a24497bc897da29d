package keymem

import (
	"fmt"

	"golang.org/x/sys/unix"
)

// HardenProcess makes the process undumpable (no core file; its
// /proc/PID/mem and ptrace open to root only, not to other processes of
// its user) and sets the core-size limit to zero, so that neither a
// crash nor a process of the same user can copy out a key the process
// holds. Call it before the first key byte is read: the setting is
// process-wide and stays for the process's life.
func HardenProcess() error {
	if err := unix.Prctl(unix.PR_SET_DUMPABLE, 0, 0, 0, 0); err != nil {
		return fmt.Errorf("prctl(PR_SET_DUMPABLE, 0): %w", err)
	}
	if err := unix.Setrlimit(unix.RLIMIT_CORE, &unix.Rlimit{Cur: 0, Max: 0}); err != nil {
		return fmt.Errorf("setrlimit(RLIMIT_CORE, 0): %w", err)
	}
	return nil
}
