// Package keymem owns key memory: every buffer that holds a key (an unwrap
// key, a volume key, an XTS key schedule, a key file's bytes) is a Buffer,
// which is locked (never swapped, never in a core dump), registered in this
// process's key-page registry until it is wiped (from before its first key
// byte for New; Random, FromBytes and Wrap register a buffer memguard has
// just filled), and wiped and unlocked on Destroy. A monitor of this process
// (ebpfmon) follows the registry, so every key page is watched.
//
// It has no dependency on the BPF loader, so that code holding keys can use
// it without pulling one in. It does not decide what a key is for.
package keymem
