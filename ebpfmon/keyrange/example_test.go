package keyrange_test

import (
	"fmt"

	"github.com/awnumar/memguard"

	"github.com/keygate/keygate/ebpfmon/keyrange"
)

// The locked-buffer code registers each key buffer when it creates it and
// unregisters it before destroying it.
func ExampleRegister() {
	key := memguard.NewBufferRandom(64)
	unregister := keyrange.Register(key.Bytes())
	fmt.Println(len(keyrange.Default.Ranges()))
	unregister()
	key.Destroy()
	fmt.Println(len(keyrange.Default.Ranges()))
	// Output:
	// 1
	// 0
}
