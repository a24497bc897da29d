package keysvc

import (
	"sync"
	"testing"
	"unsafe"

	"github.com/awnumar/memguard"
)

func TestLockedPool(t *testing.T) {
	p := newLockedPool(2, 32)
	t.Cleanup(func() { drain(p) })

	t.Run("returned buffers are wiped", func(t *testing.T) {
		a := p.get()
		fill(a.Bytes())
		p.put(a)
		// Both pooled buffers come back; whichever is the one just
		// filled must read as zero.
		b, c := p.get(), p.get()
		for _, x := range []*memguard.LockedBuffer{b, c} {
			if x.Size() != 32 || !zero(x.Bytes()) {
				t.Errorf("got a %d-byte buffer %x, want 32 zero bytes", x.Size(), x.Bytes())
			}
		}
		if b != a && c != a {
			t.Error("the returned buffer was not reused")
		}
		p.put(b)
		p.put(c)
	})

	t.Run("empty pool falls back to a fresh buffer", func(t *testing.T) {
		misses := p.misses.Load()
		held := []*memguard.LockedBuffer{p.get(), p.get(), p.get()}
		if got := p.misses.Load() - misses; got != 1 {
			t.Errorf("%d misses, want 1", got)
		}
		for _, b := range held {
			if !b.IsAlive() || !zero(b.Bytes()) {
				t.Error("fresh buffer not alive and zeroed")
			}
			fill(b.Bytes())
		}
		for _, b := range held {
			p.put(b)
		}
		// Bounded: the third buffer did not fit and was destroyed.
		if len(p.free) != 2 {
			t.Errorf("pool holds %d buffers, want 2", len(p.free))
		}
		if held[2].IsAlive() && held[1].IsAlive() && held[0].IsAlive() {
			t.Error("no buffer was destroyed when the pool overflowed")
		}
		for range 2 {
			b := p.get()
			if !zero(b.Bytes()) {
				t.Errorf("pooled buffer not wiped: %x", b.Bytes())
			}
			defer p.put(b)
		}
	})

	t.Run("destroyed buffers are replaced", func(t *testing.T) {
		b := p.get()
		b.Destroy()
		p.put(b) // dropped
		c := p.get()
		if !c.IsAlive() || c.Size() != 32 {
			t.Fatal("got a dead buffer")
		}
		p.put(c)
	})
}

// TestLockedPoolConcurrent hands buffers between goroutines (run with
// -race): no buffer is ever held by two at once, and each comes out zeroed.
func TestLockedPoolConcurrent(t *testing.T) {
	p := newLockedPool(4, 32)
	t.Cleanup(func() { drain(p) })
	var (
		mu    sync.Mutex
		inUse = map[unsafe.Pointer]bool{}
		wg    sync.WaitGroup
	)
	for range 32 {
		wg.Go(func() {
			for range 200 {
				b := p.get()
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
				p.put(b)
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

func drain(p *lockedPool) {
	for {
		select {
		case b := <-p.free:
			b.Destroy()
		default:
			return
		}
	}
}
