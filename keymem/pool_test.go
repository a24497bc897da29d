package keymem

import (
	"sync"
	"testing"
	"unsafe"

	"github.com/awnumar/memguard"
)

func TestPool(t *testing.T) {
	p := NewPool(2, 32)
	t.Cleanup(func() { drain(p) })

	t.Run("returned buffers are wiped", func(t *testing.T) {
		a := p.Get()
		fill(a.Bytes())
		p.Put(a)
		// Both pooled buffers come back; whichever is the one just
		// filled must read as zero.
		b, c := p.Get(), p.Get()
		for _, x := range []*memguard.LockedBuffer{b, c} {
			if x.Size() != 32 || !zero(x.Bytes()) {
				t.Errorf("got a %d-byte buffer %x, want 32 zero bytes", x.Size(), x.Bytes())
			}
		}
		if b != a && c != a {
			t.Error("the returned buffer was not reused")
		}
		p.Put(b)
		p.Put(c)
	})

	t.Run("empty pool falls back to a fresh buffer", func(t *testing.T) {
		misses := p.Misses()
		held := []*memguard.LockedBuffer{p.Get(), p.Get(), p.Get()}
		if got := p.Misses() - misses; got != 1 {
			t.Errorf("%d misses, want 1", got)
		}
		for _, b := range held {
			if !b.IsAlive() || !zero(b.Bytes()) {
				t.Error("fresh buffer not alive and zeroed")
			}
			fill(b.Bytes())
		}
		for _, b := range held {
			p.Put(b)
		}
		// Bounded: the third buffer did not fit and was destroyed.
		if len(p.free) != 2 {
			t.Errorf("pool holds %d buffers, want 2", len(p.free))
		}
		if held[2].IsAlive() && held[1].IsAlive() && held[0].IsAlive() {
			t.Error("no buffer was destroyed when the pool overflowed")
		}
		for range 2 {
			b := p.Get()
			if !zero(b.Bytes()) {
				t.Errorf("pooled buffer not wiped: %x", b.Bytes())
			}
			defer p.Put(b)
		}
	})

	t.Run("destroyed buffers are replaced", func(t *testing.T) {
		b := p.Get()
		b.Destroy()
		p.Put(b) // dropped
		c := p.Get()
		if !c.IsAlive() || c.Size() != 32 {
			t.Fatal("got a dead buffer")
		}
		p.Put(c)
	})
}

// TestLockedPoolConcurrent hands buffers between goroutines (run with
// -race): no buffer is ever held by two at once, and each comes out zeroed.
func TestPoolConcurrent(t *testing.T) {
	p := NewPool(4, 32)
	t.Cleanup(func() { drain(p) })
	var (
		mu    sync.Mutex
		inUse = map[unsafe.Pointer]bool{}
		wg    sync.WaitGroup
	)
	for range 32 {
		wg.Go(func() {
			for range 200 {
				b := p.Get()
				key := unsafe.Pointer(&b.Bytes()[0])
				mu.Lock()
				if inUse[key] {
					t.Error("buffer handed out twice")
				}
				inUse[key] = true
				mu.Unlock()
				if !zero(b.Bytes()) {
					t.Error("buffer handed out unwiped")
				}
				fill(b.Bytes())
				mu.Lock()
				delete(inUse, key)
				mu.Unlock()
				p.Put(b)
			}
		})
	}
	wg.Wait()
	if len(p.free) > cap(p.free) {
		t.Fatalf("pool grew past its bound: %d", len(p.free))
	}
}

func fill(b []byte) {
	for i := range b {
		b[i] = 0xa5
	}
}

func zero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

func drain(p *Pool) {
	for {
		select {
		case b := <-p.free:
			b.Destroy()
		default:
			return
		}
	}
}
