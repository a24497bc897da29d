package tpm

import "errors"

// ErrNotSupported is matched (with errors.Is) by every error about a TPM
// that lacks something keygate needs, such as a SHA-256 PCR bank. The
// error itself is an [*UnsupportedError] naming the feature.
var ErrNotSupported = errors.New("not supported by this TPM")

// UnsupportedError says which feature the TPM lacks and what to do.
type UnsupportedError struct {
	Feature string // e.g. "SHA-256 PCR bank"
	Reason  string // what is missing, and the fix if there is one
}

func (e *UnsupportedError) Error() string {
	return e.Feature + " is not available: " + e.Reason
}

// Is matches ErrNotSupported.
func (e *UnsupportedError) Is(target error) bool { return target == ErrNotSupported }
