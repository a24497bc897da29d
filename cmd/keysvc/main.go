// Command keysvc is keygate's on-premises key service: `keysvc serve` runs
// it over a data directory, and the admin subcommands (vm, volume, policy,
// revoke, erase, audit, events) call its admin API. It parses flags, calls package
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
	"slices"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/keygate/keygate/internal/cli"
	"github.com/keygate/keygate/keysvc"
	"github.com/keygate/keygate/keysvc/masterkey"
)

// version is set at build time with -ldflags "-X main.version=…".
var version = "dev"

func main() { os.Exit(run(os.Args[1:], os.Stdin, os.Stdout, os.Stderr)) }

// run executes one command line and returns the process exit code.
func run(args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	root := newRoot()
	cli.Setup(root, stdin, stdout, stderr)
	return cli.Run("keysvc", root, args, stderr)
}

func newRoot() *cobra.Command {
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
  keysvc policy learn --vm web-1

The operator guide is docs/operator.md.`,
		Version: version,
	}
	cl := &client{}
	root.AddCommand(newServeCmd())
	root.AddCommand(adminCommands(cl)...)
	mk := masterKeyCmd()
	mk.AddCommand(masterKeyAdminCmds(cl)...)
	root.AddCommand(mk, adminTokenCmd())
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
		return cli.Usage(c, fmt.Errorf("%s takes no arguments, got %q", c.CommandPath(), args))
	}
	return nil
}

func newServeCmd() *cobra.Command {
	var (
		cfg       keysvc.Config
		logFormat string
		perSource float64
		perVM     float64
		auditRate float64
		ekRoots   string
		mkTPM     string
		mkPKCS11  string
		p11Module string
		p11PIN    string
		retention time.Duration
		alerts    alertFlags
		clientCA  string
	)
	c := &cobra.Command{
		Use:   "serve --data DIR",
		Short: "Run the key service: VM API, admin API and /metrics over TLS 1.3",
		Long: `serve runs the key service over the data directory DIR.

On first start it creates, in DIR: the master key (master.key, 0600), a CA
(ca.pem; VMs pin it with --ca) with the server certificate it serves, and the
admin token (admin.token, 0600) that the admin subcommands send. Later starts
reuse them. SIGINT or SIGTERM stops it gracefully.

With --master-key-tpm the master key is kept sealed to that TPM, in
master.key.tpm (0600), instead of in the plain master.key: a copy of DIR alone
then yields no secret. Give the same flag on every start. To move an existing
plain key into the TPM, use 'keysvc master-key seal' (escrow master.key first:
a cleared or dead TPM loses every key the service holds).

With --master-key-pkcs11 'pkcs11:token=LABEL;object=NAME' (and
--pkcs11-module, --pkcs11-pin-file) the master key is a non-extractable
AES-256 key in that HSM token, created there on first start if absent; it
never leaves the token and no master.key is written. docs/operator.md
describes the set-up, and 'keysvc master-key rotate' the rotation.`,
		Args: noArgs,
		RunE: func(c *cobra.Command, _ []string) (err error) {
			if cfg.DataDir == "" {
				return cli.Usage(c, errors.New("--data DIR is required"))
			}
			var h slog.Handler
			switch logFormat {
			case "json":
				h = slog.NewJSONHandler(c.ErrOrStderr(), nil)
			case "text":
				h = slog.NewTextHandler(c.ErrOrStderr(), nil)
			default:
				return cli.Usage(c, fmt.Errorf("--log-format %q: use json or text", logFormat))
			}
			cfg.Logger = slog.New(h)
			if retention <= 0 {
				return cli.Usage(c, fmt.Errorf("--event-retention %v: give a positive duration such as 2160h", retention))
			}
			cfg.Options = append(cfg.Options, keysvc.WithRateLimits(perSource, perVM), keysvc.WithRefusalAuditRate(auditRate),
				keysvc.WithEventRetention(retention))
			if ekRoots != "" {
				pool, err := keysvc.LoadEKRoots(ekRoots)
				if err != nil {
					return err
				}
				cfg.Options = append(cfg.Options, keysvc.WithEKRoots(pool))
			}
			if cfg.Alerts, err = alerts.config(c); err != nil {
				return err
			}
			if clientCA != "" {
				if cfg.AdminClientCAs, err = loadPool("--admin-client-ca", clientCA); err != nil {
					return err
				}
			}
			ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			if mkTPM != "" && mkPKCS11 != "" {
				return cli.Usage(c, errors.New("give --master-key-tpm or --master-key-pkcs11, not both"))
			}
			p11, err := pkcs11Config(mkPKCS11, p11Module, p11PIN)
			if err != nil {
				return cli.Usage(c, err)
			}
			cfg.PKCS11 = p11
			// The TPM is needed only while Start loads the master key.
			release, err := useMasterKeyTPM(cfg.DataDir, mkTPM)
			if err != nil {
				return err
			}
			svc, err := keysvc.Start(ctx, cfg)
			release()
			if cfg.PKCS11 != nil {
				clear(cfg.PKCS11.PIN) // logged in: the PIN is no longer needed
			}
			if err != nil {
				return err
			}
			out := c.OutOrStdout()
			d := svc.Data
			mkFile, backup := keysvc.MasterKeyFile, "back up master.key and ca.key: without them nothing can be unlocked"
			if mkTPM != "" {
				mkFile = keysvc.MasterKeyFile + masterkey.SealedSuffix
				backup = "back up ca.key and keep the TPM: the master key exists only sealed to it"
			}
			if mkPKCS11 != "" {
				backup = "back up ca.key and the token (its own backup or HA): the master key never leaves it"
			}
			fmt.Fprintf(out, "keysvc serving\n  VM API:      https://%s\n  admin API:   https://%s (and /metrics)\n  dashboard:   https://%s/ui/ (log in with the admin token)\n",
				svc.VMAddr(), svc.AdminAddr(), svc.AdminAddr())
			mkWhere := d.Path(mkFile)
			if mkPKCS11 != "" {
				mkWhere = mkPKCS11 + " (in the HSM, non-extractable)"
			}
			fmt.Fprintf(out, "  CA:          %s (sha256 %s)\n  admin token: %s\n  master key:  %s",
				d.Path(keysvc.CAFile), d.CAFingerprint, d.Path(keysvc.AdminTokenFile), mkWhere)
			if mkTPM != "" {
				fmt.Fprintf(out, " (sealed to TPM %s)", mkTPM)
			}
			if mkTPM == "sim" {
				fmt.Fprint(out, "\n  warning:     the simulator is a new TPM in every process: this master key is lost when keysvc stops (tests and demos only)")
			}
			fmt.Fprintln(out)
			if len(d.Created) > 0 {
				created := slices.Clone(d.Created)
				if i := slices.Index(created, keysvc.MasterKeyFile); i >= 0 {
					created[i] = mkFile
				}
				fmt.Fprintf(out, "  created now: %v (%s)\n", created, backup)
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
	f.StringVar(&cfg.AdminListen, "admin-listen", keysvc.DefaultAdminListen, "admin API, dashboard (/ui/) and /metrics address")
	f.StringVar(&cfg.DB, "db", "sqlite", "database: sqlite (DIR/keysvc.db); postgres is not supported yet")
	f.StringSliceVar(&cfg.Hostnames, "hostname", nil, "extra DNS name or IP for the server certificate (repeatable)")
	f.StringVar(&logFormat, "log-format", "text", "log format: json or text")
	f.StringVar(&mkPKCS11, "master-key-pkcs11", "", "keep the master key in an HSM: RFC 7512 URI 'pkcs11:token=LABEL;object=NAME' of a non-extractable AES-256 key (created if absent)")
	f.StringVar(&p11Module, "pkcs11-module", "", "PKCS#11 library of the HSM (e.g. /usr/lib/softhsm/libsofthsm2.so)")
	f.StringVar(&p11PIN, "pkcs11-pin-file", "", "0600 file holding the token's user PIN")
	f.StringVar(&mkTPM, "master-key-tpm", "", "keep the master key sealed to this TPM (/dev/tpmrm0, swtpm:SOCKET or sim) in DIR/master.key.tpm")
	f.StringVar(&ekRoots, "ek-roots", "", "PEM file of CAs that EK certificates given at enrollment must chain to")
	f.Float64Var(&perSource, "rate-per-source", keysvc.DefaultSourceRate, "VM API requests per second from one address, and separately admin API requests and individually audited unauthenticated ones (burst twice that; 0: no limit)")
	f.Float64Var(&perVM, "rate-per-vm", keysvc.DefaultVMRate, "challenges per second for one VM from one source address, counted once its EK/AK match (burst twice that; 0: no limit)")
	f.Float64Var(&auditRate, "audit-refusals-per-source", keysvc.DefaultRefusalAuditRate, "VM API refusals per second from one address that get an audit record of their own; past it they are summarised (burst twice that; 0: record every one)")
	f.DurationVar(&retention, "event-retention", keysvc.DefaultEventRetention, "keep events VMs report for this long (warning and critical ones stay in the audit chain)")
	alerts.register(f)
	f.StringVar(&clientCA, "admin-client-ca", "", "PEM file of CAs: an admin client certificate chaining to them (client-auth usage) works like the admin token, for the admin API and the dashboard's login")
	return c
}
