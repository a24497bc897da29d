//go:build !linux

package boot

import "errors"

// harden fails off Linux: keygate boot relies on prctl and rlimits that
// only Linux has, and must not claim a hardening it did not do.
func harden() error {
	return errors.New("keygate boot runs on Linux only (PR_SET_DUMPABLE, RLIMIT_CORE)")
}

// MemoryProtection says what holds the keys.
func MemoryProtection() string { return "memguard (mlock'd, guard pages)" }
