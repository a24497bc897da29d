package boot_test

import (
	"context"
	"fmt"
	"log"
	"os"
	"time"

	"github.com/keygate/keygate/boot"
)

// ExampleRun unlocks a volume through the key service and serves it over
// 9P until the key service revokes the session.
func ExampleRun() {
	ca, err := os.ReadFile("/etc/keygate/ca.pem")
	if err != nil {
		log.Fatal(err)
	}
	b, err := boot.Run(context.Background(), boot.Config{
		KeysvcURL: "https://keysvc.example:8443", CA: ca,
		VM: "web1", Volume: "web1-data", Image: "/dev/vdb", TPMSpec: "/dev/tpmrm0",
		Serve9P: "/run/keygate/9p", Poll: 30 * time.Second,
		OnEvent: func(e boot.Event) { fmt.Println(e.Kind, e.Message) },
	})
	if err != nil {
		log.Fatal(err) // a *boot.Refusal prints the service's per-PCR diagnostics
	}
	defer b.Close()
	if err := b.Wait(); err != nil {
		log.Print(err) // boot.ErrRevoked: keys wiped, volume closed
	}
}
