package keysvc

import (
	"errors"
	"sync"
	"sync/atomic"

	"github.com/awnumar/memguard"

	"github.com/keygate/keygate/keysvc/masterkey"
)

// lockedPool is a fixed set of memguard locked buffers, reused for the
// unwrap keys release decrypts, so that an unlock does not pay for a locked
// buffer's mmap, mlock, mprotect and munmap (about a quarter of the
// service's CPU under load when it did).
//
// It is deliberately not a sync.Pool: that drops buffers at any GC without
// wiping or unlocking them. Here a buffered channel holds at most cap
// buffers; put wipes a buffer before it can be handed out again, and
// destroys the ones that do not fit. get never blocks: when every pooled
// buffer is in use it makes a fresh one, which put then destroys or keeps.
type lockedPool struct {
	size   int
	free   chan *memguard.LockedBuffer
	misses atomic.Uint64 // gets that found the pool empty
}

// newLockedPool allocates n buffers of size bytes each.
func newLockedPool(n, size int) *lockedPool {
	p := &lockedPool{size: size, free: make(chan *memguard.LockedBuffer, n)}
	for range n {
		p.free <- memguard.NewBuffer(size)
	}
	return p
}

// get returns a zeroed, mutable buffer of p.size bytes. Give it back with
// put.
func (p *lockedPool) get() *memguard.LockedBuffer {
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

// put wipes b and keeps it for reuse, or destroys it if the pool is full.
func (p *lockedPool) put(b *memguard.LockedBuffer) {
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

// Sizes of the pool of buffers for unwrap keys. A slot holds a key of up to
// ukSlotSize bytes, the most a TPM imports as sealed data (MAX_SYM_DATA);
// longer keys take the Open path. ukPoolSize bounds the locked memory
// (one page per buffer) and covers far more unlocks in flight between
// decryption and CreateImportBlob than two cores run at once.
const (
	ukSlotSize = 128
	ukPoolSize = 64
)

var (
	ukPoolOnce sync.Once
	ukPoolV    *lockedPool
)

// ukPool is the process's pool for unwrap keys, made on first use so that
// importing the package locks no memory. It is shared by every Server in
// the process: buffers hold nothing between uses.
func ukPool() *lockedPool {
	ukPoolOnce.Do(func() { ukPoolV = newLockedPool(ukPoolSize, ukSlotSize) })
	return ukPoolV
}

// openerTo is implemented by a MasterKey that can decrypt into a caller's
// locked buffer (*masterkey.Key does).
type openerTo interface {
	OpenTo(dst []byte, recordID string, sealed []byte) (int, error)
}

// openUK decrypts a volume's sealed unwrap key into locked memory and
// returns it with the function that wipes it and gives the memory back.
// With a MasterKey that has OpenTo and a key that fits a slot, the memory
// comes from ukPool; otherwise it is Open's own buffer.
//
// During a master-key rotation a row not yet re-sealed opens under the
// previous key (keyring.go).
func (s *Server) openUK(id string, sealed []byte) (uk []byte, done func(), err error) {
	ks := s.rows.load()
	uk, done, err = openUKWith(ks.cur, id, sealed)
	if err != nil && ks.prev != nil && errors.Is(err, masterkey.ErrOpen) {
		uk, done, err = openUKWith(ks.prev, id, sealed)
	}
	return uk, done, err
}

func openUKWith(mk MasterKey, id string, sealed []byte) (uk []byte, done func(), err error) {
	if o, ok := mk.(openerTo); ok && len(sealed) <= ukSlotSize+masterkey.SealOverhead {
		p := ukPool()
		buf := p.get()
		n, err := o.OpenTo(buf.Bytes(), id, sealed)
		if err != nil {
			p.put(buf)
			return nil, nil, err
		}
		return buf.Bytes()[:n], func() { p.put(buf) }, nil
	}
	buf, err := mk.Open(id, sealed)
	if err != nil {
		return nil, nil, err
	}
	return buf.Bytes(), buf.Destroy, nil
}
