package xts

import (
	"runtime"
	"testing"
	"time"
	"unsafe"

	"github.com/keygate/keygate/keymem"
)

// covered reports whether keymem.Default has a range holding all of b.
func covered(b []byte) bool {
	lo := uint64(uintptr(unsafe.Pointer(unsafe.SliceData(b))))
	hi := lo + uint64(len(b))
	for _, r := range keymem.Default.Ranges() {
		if r.Start <= lo && hi <= r.End {
			return true
		}
	}
	return false
}

// TestKeyPagesRegistered checks that the schedule's pages are in the
// key-page registry (which a monitor follows) for exactly as long as the
// schedule exists: from New, until Close or until a dropped Cipher's
// cleanup destroys it.
func TestKeyPagesRegistered(t *testing.T) {
	for _, tc := range []struct {
		name string
		drop func(*Cipher) // ends the Cipher's life
	}{
		{"close", func(c *Cipher) { c.Close() }},
		{"close twice", func(c *Cipher) { c.Close(); c.Close() }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := len(keymem.Default.Ranges())
			c, err := New(make([]byte, 64))
			if err != nil {
				t.Fatal(err)
			}
			whole := c.buf.buf.Bytes()
			if !covered(whole) {
				t.Fatalf("schedule %p+%d not in the registry %v", &whole[0], len(whole), keymem.Default.Ranges())
			}
			tc.drop(c)
			if n := len(keymem.Default.Ranges()); n != before {
				t.Fatalf("%d ranges registered after Close, %d before New", n, before)
			}
		})
	}
	t.Run("dropped", func(t *testing.T) {
		before := len(keymem.Default.Ranges())
		c, err := New(make([]byte, 32))
		if err != nil {
			t.Fatal(err)
		}
		buf := c.buf.buf
		if !covered(buf.Bytes()) {
			t.Fatal("schedule not in the registry")
		}
		c = nil
		for deadline := time.Now().Add(5 * time.Second); buf.Alive() && time.Now().Before(deadline); {
			runtime.GC()
			time.Sleep(2 * time.Millisecond)
		}
		if buf.Alive() {
			t.Fatal("locked buffer of an unreachable Cipher was never destroyed")
		}
		if n := len(keymem.Default.Ranges()); n != before {
			t.Fatalf("%d ranges registered after the cleanup, %d before New", n, before)
		}
	})
}
