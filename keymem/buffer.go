package keymem

import (
	"errors"
	"fmt"
	"os"
	"sync"

	"github.com/awnumar/memguard"
	"golang.org/x/sys/unix"
)

// ErrLock means the kernel refused to lock memory for a key. memguard
// would panic (wiping every other key of the process first); Buffer
// returns this instead.
var ErrLock = errors.New("cannot lock memory for a key (raise the locked-memory limit: ulimit -l, LimitMEMLOCK= in a systemd unit, or run with CAP_IPC_LOCK)")

// Buffer is key material in locked memory whose pages are in Default from
// its creation until Destroy. It is safe to Destroy more than once.
type Buffer struct {
	lb         *memguard.LockedBuffer
	unregister func()
	once       sync.Once
}

// New returns n zero bytes of key memory.
func New(n int) (*Buffer, error) {
	if err := probe(n); err != nil {
		return nil, err
	}
	return Wrap(memguard.NewBuffer(n)), nil
}

// Random returns n random bytes of key memory.
func Random(n int) (*Buffer, error) {
	if err := probe(n); err != nil {
		return nil, err
	}
	return Wrap(memguard.NewBufferRandom(n)), nil
}

// FromBytes moves p into key memory and wipes p, whatever happens.
func FromBytes(p []byte) (*Buffer, error) {
	if err := probe(len(p)); err != nil {
		clear(p)
		return nil, err
	}
	return Wrap(memguard.NewBufferFromBytes(p)), nil
}

// Wrap registers a locked buffer made elsewhere (luks2 hands out volume
// keys as memguard buffers) and takes it over: Destroy wipes it.
func Wrap(lb *memguard.LockedBuffer) *Buffer {
	return &Buffer{lb: lb, unregister: register(lb.Bytes())}
}

// Bytes is the key material; it is valid until Destroy.
func (b *Buffer) Bytes() []byte { return b.lb.Bytes() }

// Size is the length of the key material.
func (b *Buffer) Size() int { return b.lb.Size() }

// Destroy removes the pages from the registry (so that a monitor stops
// guarding memory that will no longer hold a key), then wipes, unlocks and
// unmaps them.
func (b *Buffer) Destroy() {
	b.once.Do(func() {
		b.unregister()
		b.lb.Destroy()
	})
}

// probe locks and unlocks as many pages as a buffer of n bytes needs,
// so that a refusal is an error here rather than a panic inside memguard.
// Another allocation between the probe and memguard's own mlock could still
// exhaust the limit; the window is a few microseconds.
func probe(n int) error {
	if n <= 0 {
		return nil
	}
	page := os.Getpagesize()
	size := (n + 2*page - 1) / page * page // memguard adds a canary page's worth
	mem, err := unix.Mmap(-1, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		return fmt.Errorf("%w: map %d bytes: %v", ErrLock, size, err)
	}
	defer unix.Munmap(mem)
	if err := unix.Mlock(mem); err != nil {
		return fmt.Errorf("%w: lock %d bytes: %v", ErrLock, size, err)
	}
	return unix.Munlock(mem)
}

// Locked is the underlying memguard buffer, for APIs that take one
// (luks2's AddKeyslot). The Buffer still owns it: do not Destroy it.
func (b *Buffer) Locked() *memguard.LockedBuffer { return b.lb }

// Alive reports whether the buffer still holds its key (not yet destroyed).
func (b *Buffer) Alive() bool { return b.lb.IsAlive() }
