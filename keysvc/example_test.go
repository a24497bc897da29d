package keysvc_test

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"

	"github.com/keygate/keygate/keysvc"
)

// ExampleStart runs a key service over a fresh data directory on random
// local ports, as `keysvc serve --data DIR` does, and stops it.
func ExampleStart() {
	dir, _ := os.MkdirTemp("", "keysvc-example")
	defer os.RemoveAll(dir)
	svc, err := keysvc.Start(context.Background(), keysvc.Config{
		DataDir: dir, Listen: "127.0.0.1:0", AdminListen: "127.0.0.1:0",
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil)),
	})
	if err != nil {
		fmt.Println(err)
		return
	}
	defer svc.Shutdown(context.Background())
	fmt.Println("created:", svc.Data.Created)
	fmt.Println("VMs pin:", svc.Data.Path(keysvc.CAFile) != "")
	// Output:
	// created: [ca.key ca.pem server.key server.pem admin.token master.key]
	// VMs pin: true
}
