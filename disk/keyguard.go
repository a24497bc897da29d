package disk

import (
	"errors"
	"sync"

	"github.com/keygate/keygate/disk/xts"
)

// ErrKeyWiped is what reads and writes return once Image.Wipe has run: the
// volume's key schedule is gone, so nothing more is read or written.
var ErrKeyWiped = errors.New("disk: the volume's keys were wiped (it was locked); open the image again with its key")

// keyGuard is a volume's cipher and the right to wipe it while I/O is under
// way. Encryption and decryption hold it shared for the cipher's work
// alone, never across a pread or pwrite, so a wipe waits for computation
// and not for a disk that stopped answering: a revoke must not leave the
// key schedule in memory behind a hung read of a network disk. Whatever
// runs after the wipe fails with ErrKeyWiped rather than using freed pages.
type keyGuard struct {
	mu sync.RWMutex
	c  *xts.Cipher // nil once wiped
}

// sectors en- or decrypts whole sectors of src into dst (which may be src).
func (g *keyGuard) sectors(dst, src []byte, ss int, first, step uint64, dec bool) error {
	g.mu.RLock()
	defer g.mu.RUnlock()
	switch {
	case g.c == nil:
		return ErrKeyWiped
	case dec:
		g.c.DecryptSectors(dst, src, ss, first, step)
	default:
		g.c.EncryptSectors(dst, src, ss, first, step)
	}
	return nil
}

// wipe destroys the key schedule once the computations under way end.
func (g *keyGuard) wipe() error {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.c == nil {
		return nil
	}
	err := g.c.Close()
	g.c = nil
	return err
}
