//go:build !linux

package boot

// MemoryProtection says what holds the keys.
func MemoryProtection() string { return "memguard (mlock'd, guard pages)" }
