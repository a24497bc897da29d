// Package cli holds what keygate's two commands, keygate and keysvc, share:
// the exit-code contract, containment of panics, and usage errors that point
// at --help. The commands themselves stay thin over the libraries.
package cli

import (
	"errors"
	"fmt"
	"io"

	"github.com/spf13/cobra"
)

// ExitFailure is the exit code of a command that failed; ExitBug is the exit
// code of a panic, which is always a bug.
const (
	ExitFailure = 1
	ExitBug     = 2
)

// UsageError marks a mistake in the command line itself, as opposed to a
// failure while doing the work, so that Run can point at --help.
type UsageError struct {
	Cmd string
	Err error
}

func (e UsageError) Error() string { return e.Err.Error() }
func (e UsageError) Unwrap() error { return e.Err }

// Usage wraps err as a mistake in c's command line.
func Usage(c *cobra.Command, err error) error { return UsageError{Cmd: c.CommandPath(), Err: err} }

// Usagef is Usage with a formatted message.
func Usagef(c *cobra.Command, format string, a ...any) error {
	return Usage(c, fmt.Errorf(format, a...))
}

// Setup makes root print nothing of cobra's own on failure (Run reports
// errors) and turns flag errors into usage errors.
func Setup(root *cobra.Command, stdin io.Reader, stdout, stderr io.Writer) {
	root.SilenceUsage = true
	root.SilenceErrors = true
	root.SetIn(stdin)
	root.SetOut(stdout)
	root.SetErr(stderr)
	root.SetFlagErrorFunc(func(c *cobra.Command, err error) error { return Usage(c, err) })
}

// Run executes root with args and returns the process exit code: 0, or
// ExitFailure with "NAME: error" on stderr (plus a pointer to --help for a
// usage error). A panic never escapes as a Go stack trace: the user gets a
// one-line message saying it is a bug, and ExitBug.
func Run(name string, root *cobra.Command, args []string, stderr io.Writer) (code int) {
	defer func() {
		if r := recover(); r != nil {
			fmt.Fprintf(stderr, "%s: internal error: %v\nThis is a bug; please report it with the command line you ran.\n", name, r)
			code = ExitBug
		}
	}()
	root.SetArgs(args)
	if err := root.Execute(); err != nil {
		fmt.Fprintf(stderr, "%s: %v\n", name, err)
		var ue UsageError
		if errors.As(err, &ue) {
			fmt.Fprintf(stderr, "Run '%s --help' for usage.\n", ue.Cmd)
		}
		return ExitFailure
	}
	return 0
}

// ExactArgs is cobra.ExactArgs with a message that names the expected
// arguments, since "accepts 2 arg(s), received 1" does not say which.
func ExactArgs(names ...string) cobra.PositionalArgs {
	return func(c *cobra.Command, args []string) error {
		if len(args) != len(names) {
			return Usagef(c, "%s needs %d arguments (%v), got %d", c.CommandPath(), len(names), names, len(args))
		}
		return nil
	}
}
