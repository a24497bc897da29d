//go:build !linux

package keymem

import "errors"

// HardenProcess fails off Linux: the prctl and rlimit it relies on are
// Linux's, and a caller must not claim a hardening that was not done.
func HardenProcess() error {
	return errors.New("keygate hardens its process on Linux only (PR_SET_DUMPABLE, RLIMIT_CORE)")
}
