package xts

import (
	"testing"

	"github.com/keygate/keygate/keymem"
)

// BenchmarkRegister is what registering a key buffer costs when no monitor
// follows the registry, against BenchmarkNewClose, the life of a Cipher it
// is part of.
func BenchmarkRegister(b *testing.B) {
	buf := make([]byte, lockedSize)
	for b.Loop() {
		keymem.Default.Add(buf)()
	}
}

func BenchmarkNewClose(b *testing.B) {
	key := make([]byte, 64)
	for b.Loop() {
		c, err := New(key)
		if err != nil {
			b.Fatal(err)
		}
		c.Close()
	}
}
