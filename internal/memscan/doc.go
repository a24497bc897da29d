// Package memscan searches the memory of the running process for secrets,
// so that a test can prove that a key left no copy behind: not on the Go
// heap, not on a goroutine or signal stack, not in a C or mmap'd region.
// It reads every readable mapping of /proc/self/maps through
// /proc/self/mem, and so works only on Linux.
//
// A Needle holds its secret complemented (every bit flipped), so the
// scanner and the test that builds it hold no plain copy that the scan
// would find. Needles for the usual transforms of a key (XOR with a pad
// byte, hash words read in the other byte order, pieces of it) are derived
// from a needle without ever forming the plain secret.
//
// The package owns the scan only; deciding which secrets to look for and
// which ranges (a live locked buffer) to skip is the test's business.
package memscan
