package keymem_test

import (
	"fmt"

	"github.com/keygate/keygate/keymem"
)

// A key holder makes its key memory with keymem, which registers the pages
// for the monitor, and destroys it when done, which unregisters and wipes.
func ExampleNew() {
	key, err := keymem.New(64)
	if err != nil {
		fmt.Println(err)
		return
	}
	fmt.Println(len(keymem.Default.Ranges()))
	key.Destroy()
	fmt.Println(len(keymem.Default.Ranges()))
	// Output:
	// 1
	// 0
}
