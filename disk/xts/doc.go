// Package xts implements XTS-AES (IEEE 1619) over whole disk sectors, as
// LUKS2's aes-xts-plain64 uses it: the tweak of a data unit is its number as
// a 128-bit little-endian integer.
//
// The package owns the sector cipher and its key schedule, nothing else. The
// caller owns the key bytes it passes to New (it may wipe them afterwards);
// the LUKS2 format, keyslots and I/O live elsewhere.
//
// # Key material
//
// crypto/aes keeps its expanded key on the Go heap, where the garbage
// collector may copy it and a core dump would find it. Here the encryption
// and decryption round keys of both XTS keys are expanded straight into one
// memguard LockedBuffer (mlocked, guard pages, wiped and unlocked by Close,
// or by a cleanup if a Cipher is dropped unclosed). The expansion uses an
// S-box computed arithmetically, so it leaks no key bits through cache
// timing. The assembly uses round keys only as memory operands, never
// loading them into vector registers, because a signal arriving mid-call
// makes the kernel save those registers into a signal frame in ordinary
// memory. A test scans the whole process for round keys after use.
//
// # Implementations
//
// New picks the fastest implementation the CPU supports (see
// Implementation):
//
//   - vaes512 (amd64, AVX-512 with VAES and VPCLMULQDQ): four blocks per
//     zmm register, 32 blocks in flight, tweaks computed four lanes at a time.
//   - vaes256 (amd64, AVX2 with VAES and VPCLMULQDQ but no AVX-512, such as
//     AMD Zen 3 or Intel Alder Lake): two blocks per ymm, 16 in flight.
//   - aesni (amd64 with AES-NI and SSE4.1): eight xmm blocks in flight.
//   - purego: a table-based AES for CPUs without AES-NI and for other
//     architectures. It is NOT constant-time (table lookups indexed by
//     secret state leak through cache timing) and it holds round-key words
//     in general registers while it runs, so it is only a fallback.
//
// Build with the purego tag to force the pure-Go code on amd64.
//
// Ciphertext stealing is not implemented: every data unit is a whole number
// of 16-byte blocks, which is all disk sectors need.
package xts
