package keymem

import (
	"sync/atomic"

	"github.com/awnumar/memguard"
)

// Pool is a fixed set of memguard locked buffers of one size, reused for
// short-lived secrets on a hot path (keysvc's unwrap keys, the scratch of
// an import blob), so that each use does not pay for a locked buffer's
// mmap, mlock, mprotect and munmap (about a quarter of the key service's
// CPU under load when it did). Its buffers are not registered in Default:
// they hold keys only between Get and Put, in processes (the key service)
// that run no monitor.
//
// It is deliberately not a sync.Pool: that drops buffers at any GC without
// wiping or unlocking them. Here a buffered channel holds at most cap
// buffers; Put wipes a buffer before it can be handed out again, and
// destroys the ones that do not fit. Get never blocks: when every pooled
// buffer is in use it makes a fresh one, which Put then destroys or keeps.
type Pool struct {
	size   int
	free   chan *memguard.LockedBuffer
	misses atomic.Uint64 // gets that found the pool empty
}

// NewPool allocates n buffers of size bytes each.
func NewPool(n, size int) *Pool {
	p := &Pool{size: size, free: make(chan *memguard.LockedBuffer, n)}
	for range n {
		p.free <- memguard.NewBuffer(size)
	}
	return p
}

// Get returns a zeroed, mutable buffer of the pool's size. Give it back
// with Put.
func (p *Pool) Get() *memguard.LockedBuffer {
	for {
		select {
		case b := <-p.free:
			if b.IsAlive() && b.IsMutable() && b.Size() == p.size {
				return b
			}
			// Destroyed behind the pool's back (memguard.Purge): drop it.
			b.Destroy()
			continue
		default:
		}
		p.misses.Add(1)
		return memguard.NewBuffer(p.size)
	}
}

// Put wipes b and keeps it for reuse, or destroys it if the pool is full.
func (p *Pool) Put(b *memguard.LockedBuffer) {
	if !b.IsAlive() || !b.IsMutable() || b.Size() != p.size {
		b.Destroy()
		return
	}
	b.Wipe()
	select {
	case p.free <- b:
	default:
		b.Destroy()
	}
}

// Misses counts the Gets that found the pool empty and made a buffer.
func (p *Pool) Misses() uint64 { return p.misses.Load() }
