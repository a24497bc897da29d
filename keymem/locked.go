package keymem

import "github.com/awnumar/memguard"

// NewLocked returns n zero bytes of locked memory as a bare memguard buffer,
// outside the registry, or ErrLock where memguard would panic. It is for
// code that hands a key to a caller as a memguard buffer (luks2's volume
// keys), which the caller registers with Wrap; key memory a package keeps
// to itself comes from New.
func NewLocked(n int) (*memguard.LockedBuffer, error) {
	if err := probe(n); err != nil {
		return nil, err
	}
	return memguard.NewBuffer(n), nil
}
