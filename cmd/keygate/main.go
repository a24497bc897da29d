// Command keygate is the VM-side and admin CLI of keygate: encrypted disk
// images (`keygate disk …`), the demo, and, as they land, boot, monitor and
// tpm. It parses flags, calls the libraries and prints; the work lives in
// the packages under disk/, tpm/, attest/ and boot/.
package main

import (
	"fmt"
	"io"
	"os"

	"github.com/spf13/cobra"

	"github.com/keygate/keygate/internal/cli"
)

// version is set at build time with -ldflags "-X main.version=…".
var version = "dev"

func main() { os.Exit(run(os.Args[1:], os.Stdin, os.Stdout, os.Stderr)) }

// run executes one command line and returns the process exit code.
func run(args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	root := newRoot()
	cli.Setup(root, stdin, stdout, stderr)
	return cli.Run("keygate", root, args, stderr)
}

func newRoot() *cobra.Command {
	root := &cobra.Command{
		Use:   "keygate",
		Short: "Keep cloud VM volumes encrypted under keys the provider never holds",
		Long: `keygate encrypts VM volumes inside the guest. Volumes are LUKS2 images
(compatible with cryptsetup) opened entirely in user space; their files are
reached through go-diskfs.

Start with:
  keygate demo                                   the whole story, in seconds
  keygate disk create vol.img --size 256M --key-file key
  keygate disk put vol.img notes.txt /notes.txt --key-file key`,
		Version: version,
	}
	root.AddCommand(newTPMCmd(), newBootCmd())
	root.AddCommand(newMonitorCmd())
	root.AddCommand(newDiskCmd(), newDemoCmd(), &cobra.Command{
		Use:   "version",
		Short: "Print keygate's version",
		Args:  cobra.NoArgs,
		Run:   func(c *cobra.Command, _ []string) { fmt.Fprintln(c.OutOrStdout(), "keygate", version) },
	})
	return root
}
