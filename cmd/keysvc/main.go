// Command keysvc is keygate's on-premises key service: `keysvc serve` runs
// it over a data directory, and the admin subcommands (vm, volume, policy,
// revoke, erase, audit) call its admin API. It parses flags, calls package
// keysvc (or the admin API) and prints; the work lives in keysvc/.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/keygate/keygate/keysvc"
)

// version is set at build time with -ldflags "-X main.version=…".
var version = "dev"

const exitCode = 1

func main() { os.Exit(run(os.Args[1:], os.Stdin, os.Stdout, os.Stderr)) }

// run executes one command line and returns the process exit code. A panic
// is a bug: the user gets a one-line message, not a stack trace.
func run(args []string, stdin io.Reader, stdout, stderr io.Writer) (code int) {
	defer func() {
		if r := recover(); r != nil {
			fmt.Fprintf(stderr, "keysvc: internal error: %v\nThis is a bug; please report it with the command line you ran.\n", r)
			code = 2
		}
	}()
	root := newRoot(stdin, stdout, stderr)
	root.SetArgs(args)
	if err := root.Execute(); err != nil {
		fmt.Fprintf(stderr, "keysvc: %v\n", err)
		var ue usageError
		if errors.As(err, &ue) {
			fmt.Fprintf(stderr, "Run '%s --help' for usage.\n", ue.cmd)
		}
		return exitCode
	}
	return 0
}

// usageError marks a mistake in the command line itself.
type usageError struct {
	cmd string
	err error
}

func (e usageError) Error() string { return e.err.Error() }
func (e usageError) Unwrap() error { return e.err }

func newRoot(stdin io.Reader, stdout, stderr io.Writer) *cobra.Command {
	root := &cobra.Command{
		Use:   "keysvc",
		Short: "keygate's key service: releases volume keys to attested VMs",
		Long: `keysvc keeps each volume's unwrap key and releases it, sealed to the VM's
TPM, only after the VM's vTPM proves which machine it is and what it booted.

Start with:
  keysvc serve --data /var/lib/keysvc
  export KEYSVC_TOKEN_FILE=/var/lib/keysvc/admin.token KEYSVC_CA=/var/lib/keysvc/ca.pem
  keysvc vm enroll --name web-1 --ek-pub ek.pem --ak-pub ak.pem
  keysvc volume create --id web-1-data --vm web-1
  keysvc policy learn --vm web-1`,
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
	cl := &client{}
	root.AddCommand(newServeCmd())
	root.AddCommand(adminCommands(cl)...)
	root.AddCommand(&cobra.Command{
		Use:   "version",
		Short: "Print keysvc's version",
		Args:  cobra.NoArgs,
		Run:   func(c *cobra.Command, _ []string) { fmt.Fprintln(c.OutOrStdout(), "keysvc", version) },
	})
	return root
}

func noArgs(c *cobra.Command, args []string) error {
	if len(args) != 0 {
		return usageError{cmd: c.CommandPath(), err: fmt.Errorf("%s takes no arguments, got %q", c.CommandPath(), args)}
	}
	return nil
}

func newServeCmd() *cobra.Command {
	var (
		cfg       keysvc.Config
		logFormat string
		perSource float64
		perVM     float64
		ekRoots   string
	)
	c := &cobra.Command{
		Use:   "serve --data DIR",
		Short: "Run the key service: VM API, admin API and /metrics over TLS 1.3",
		Long: `serve runs the key service over the data directory DIR.

On first start it creates, in DIR: the master key (master.key, 0600), a CA
(ca.pem; VMs pin it with --ca) with the server certificate it serves, and the
admin token (admin.token, 0600) that the admin subcommands send. Later starts
reuse them. SIGINT or SIGTERM stops it gracefully.`,
		Args: noArgs,
		RunE: func(c *cobra.Command, _ []string) error {
			if cfg.DataDir == "" {
				return usageError{cmd: c.CommandPath(), err: errors.New("--data DIR is required")}
			}
			var h slog.Handler
			switch logFormat {
			case "json":
				h = slog.NewJSONHandler(c.ErrOrStderr(), nil)
			case "text":
				h = slog.NewTextHandler(c.ErrOrStderr(), nil)
			default:
				return usageError{cmd: c.CommandPath(), err: fmt.Errorf("--log-format %q: use json or text", logFormat)}
			}
			cfg.Logger = slog.New(h)
			cfg.Options = append(cfg.Options, keysvc.WithRateLimits(perSource, perVM))
			if ekRoots != "" {
				pool, err := keysvc.LoadEKRoots(ekRoots)
				if err != nil {
					return err
				}
				cfg.Options = append(cfg.Options, keysvc.WithEKRoots(pool))
			}
			ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			svc, err := keysvc.Start(ctx, cfg)
			if err != nil {
				return err
			}
			out := c.OutOrStdout()
			d := svc.Data
			fmt.Fprintf(out, "keysvc serving\n  VM API:      https://%s\n  admin API:   https://%s (and /metrics)\n", svc.VMAddr(), svc.AdminAddr())
			fmt.Fprintf(out, "  CA:          %s (sha256 %s)\n  admin token: %s\n  master key:  %s\n",
				d.Path(keysvc.CAFile), d.CAFingerprint, d.Path(keysvc.AdminTokenFile), d.Path(keysvc.MasterKeyFile))
			if len(d.Created) > 0 {
				fmt.Fprintf(out, "  created now: %v (back up master.key and ca.key: without them nothing can be unlocked)\n", d.Created)
			}
			var serveErr error
			select {
			case <-ctx.Done():
			case serveErr = <-svc.Err():
			}
			sctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
			defer cancel()
			if err := svc.Shutdown(sctx); err != nil && serveErr == nil {
				serveErr = fmt.Errorf("shutdown: %w", err)
			}
			if serveErr != nil {
				return serveErr
			}
			fmt.Fprintln(out, "keysvc stopped")
			return nil
		},
	}
	f := c.Flags()
	f.StringVar(&cfg.DataDir, "data", "", "data directory (created 0700 if missing)")
	f.StringVar(&cfg.Listen, "listen", keysvc.DefaultListen, "VM API address")
	f.StringVar(&cfg.AdminListen, "admin-listen", keysvc.DefaultAdminListen, "admin API and /metrics address")
	f.StringVar(&cfg.DB, "db", "sqlite", "database: sqlite (DIR/keysvc.db); postgres is not supported yet")
	f.StringSliceVar(&cfg.Hostnames, "hostname", nil, "extra DNS name or IP for the server certificate (repeatable)")
	f.StringVar(&logFormat, "log-format", "text", "log format: json or text")
	f.StringVar(&ekRoots, "ek-roots", "", "PEM file of CAs that EK certificates given at enrollment must chain to")
	f.Float64Var(&perSource, "rate-per-source", keysvc.DefaultSourceRate, "VM API requests per second from one address (burst twice that; 0: no limit)")
	f.Float64Var(&perVM, "rate-per-vm", keysvc.DefaultVMRate, "challenges per second for one VM (burst twice that; 0: no limit)")
	return c
}
