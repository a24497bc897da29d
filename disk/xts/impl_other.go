//go:build !amd64 || purego

package xts

// hasAESNI reports whether the AES-NI code is built and usable; here it is
// not built.
const hasAESNI = false

func availableImpls() []impl { return []impl{implGeneric} }

func cryptAsm(impl, []byte, int, []byte, []byte, uint64, bool) bool { return false }
