package ebpfmon_test

import (
	"context"
	"fmt"
	"log"
	"os"

	"github.com/keygate/keygate/ebpfmon"
	"github.com/keygate/keygate/keymem"
)

// A key holder runs the monitor in its own process: it follows the key
// registry, writes JSON lines, and wipes the keys on the first critical alert.
func ExampleStart() {
	ctx := context.Background()
	m, err := ebpfmon.Start(ctx, ebpfmon.Config{Self: keymem.Default})
	if err != nil {
		log.Fatal(err)
	}
	defer m.Close()
	mode, why := m.Mode()
	fmt.Fprintf(os.Stderr, "monitor in %s mode: %s\n", mode, why)
	lock := func(e ebpfmon.Event) { /* wipe the keys, close the volume */ }
	ebpfmon.Dispatch(ctx, m.Events(), nil, ebpfmon.NewJSONSink(os.Stdout), ebpfmon.OnAlert(ebpfmon.Critical, lock))
}
