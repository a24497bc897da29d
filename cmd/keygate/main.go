// Command keygate is the VM-side and admin CLI of keygate: encrypted disk
// images (`keygate disk …`), the demo, and, as they land, boot, monitor and
// tpm. It parses flags, calls the libraries and prints; the work lives in
// the packages under disk/, tpm/, attest/ and boot/.
package main

import (
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/spf13/cobra"
)

// version is set at build time with -ldflags "-X main.version=…".
var version = "dev"

// exitCode is what main returns for a failed command. It is a variable so
// that tests running main in-process see the same contract.
const exitCode = 1

func main() { os.Exit(run(os.Args[1:], os.Stdin, os.Stdout, os.Stderr)) }

// run executes one command line and returns the process exit code. It never
// lets a panic escape as a Go stack trace: a panic is a bug, and the user gets
// a one-line message saying so, with a non-zero exit.
func run(args []string, stdin io.Reader, stdout, stderr io.Writer) (code int) {
	defer func() {
		if r := recover(); r != nil {
			fmt.Fprintf(stderr, "keygate: internal error: %v\nThis is a bug; please report it with the command line you ran.\n", r)
			code = 2
		}
	}()
	root := newRoot(stdin, stdout, stderr)
	root.SetArgs(args)
	if err := root.Execute(); err != nil {
		fmt.Fprintf(stderr, "keygate: %v\n", err)
		var ue usageError
		if errors.As(err, &ue) {
			fmt.Fprintf(stderr, "Run '%s --help' for usage.\n", ue.cmd)
		}
		return exitCode
	}
	return 0
}

// usageError marks a mistake in the command line itself, as opposed to a
// failure while doing the work, so that run can point at --help.
type usageError struct {
	cmd string
	err error
}

func (e usageError) Error() string { return e.err.Error() }
func (e usageError) Unwrap() error { return e.err }

func newRoot(stdin io.Reader, stdout, stderr io.Writer) *cobra.Command {
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
		SilenceUsage:  true,
		SilenceErrors: true,
		Version:       version,
	}
	root.SetIn(stdin)
	root.SetOut(stdout)
	root.SetErr(stderr)
	root.SetFlagErrorFunc(func(c *cobra.Command, err error) error {
		return usageError{cmd: c.CommandPath(), err: err}
	})
	root.AddCommand(newTPMCmd())
	root.AddCommand(newDiskCmd(), newDemoCmd(), &cobra.Command{
		Use:   "version",
		Short: "Print keygate's version",
		Args:  cobra.NoArgs,
		Run:   func(c *cobra.Command, _ []string) { fmt.Fprintln(c.OutOrStdout(), "keygate", version) },
	})
	return root
}

// exactArgs is cobra.ExactArgs with a message that names the expected
// arguments, since "accepts 2 arg(s), received 1" does not say which.
func exactArgs(names ...string) cobra.PositionalArgs {
	return func(c *cobra.Command, args []string) error {
		if len(args) != len(names) {
			return usageError{cmd: c.CommandPath(), err: fmt.Errorf("%s needs %d arguments (%v), got %d", c.CommandPath(), len(names), names, len(args))}
		}
		return nil
	}
}
