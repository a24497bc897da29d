//go:build !cgo

package tpm

// openSim fails in a build without cgo: the go-tpm-tools simulator is C
// (the Microsoft reference TPM linked against OpenSSL). Static builds, such
// as the one in the test VM's initramfs, use /dev/tpmrm0 or swtpm instead.
func openSim() (*TPM, error) {
	return nil, &UnsupportedError{Feature: "the in-process simulator",
		Reason: "this keygate was built without cgo; rebuild with CGO_ENABLED=1 and libssl-dev installed, or use swtpm:SOCKET"}
}
