package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/spf13/cobra"

	"github.com/keygate/keygate/internal/cli"
	"github.com/keygate/keygate/keysvc"
	"github.com/keygate/keygate/keysvc/store"
)

func migrateCmd() *cobra.Command {
	var (
		from, to, mkTPM string
		asJSON          bool
	)
	c := &cobra.Command{
		Use:   "migrate --from DIR/keysvc.db --to postgres://...",
		Short: "Copy the key service's SQLite store into an empty PostgreSQL database",
		Long: `migrate copies every record of the SQLite store in a data directory (VMs,
volumes and their sealed keys, used challenges, the audit chain with its head
and anchor, VM events, the master key check) into an empty PostgreSQL
database, byte for byte, in one transaction, and then verifies the copied
audit chain under the data directory's master key.

Stop the service first: writes made during the copy are not copied. The
target must be empty (a new database; the schema is created here). Afterwards
start the service, and any replica made from a copy of the data directory,
with --db and the same URL. The SQLite file is left as it was.

The URL is a libpq connection string, for example
  postgres://keysvc@db1:5432,db2:5432/keysvc?sslmode=verify-full&target_session_attrs=read-write
(put the password in ~/.pgpass or PGPASSWORD rather than on the command line).`,
		Args: noArgs,
		RunE: func(c *cobra.Command, _ []string) error {
			if err := required(c, "from", "to"); err != nil {
				return err
			}
			if !store.IsPostgresURL(to) {
				return cli.Usage(c, errors.New("--to must be a postgres:// or postgresql:// URL"))
			}
			dir := from
			if strings.HasSuffix(from, ".db") {
				if filepath.Base(from) != store.DBFile {
					return cli.Usage(c, fmt.Errorf("--from %s: give the data directory or its %s", from, store.DBFile))
				}
				dir = filepath.Dir(from)
			}
			ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			release, err := useMasterKeyTPM(dir, mkTPM)
			if err != nil {
				return err
			}
			defer release()
			rep, err := keysvc.MigrateToPostgres(ctx, dir, to)
			if err != nil {
				return err
			}
			if asJSON {
				return printJSON(c, rep)
			}
			n := rep.Copied
			fmt.Fprintf(c.OutOrStdout(), "copied %d VMs, %d volumes, %d used challenges, %d audit records, %d VM events (anchor: %v, master key check: %v)\n",
				n.VMs, n.Volumes, n.Challenges, n.Audit, n.Events, n.Anchor, n.MasterKey)
			fmt.Fprintf(c.OutOrStdout(), "audit chain verified in PostgreSQL: %d records, head %d\nstart the service with --db and this URL\n", rep.AuditRecords, rep.AuditHead)
			return nil
		},
	}
	f := c.Flags()
	f.StringVar(&from, "from", "", "the SQLite store: DIR/keysvc.db or the data directory DIR (its master key verifies the copy)")
	f.StringVar(&to, "to", "", "the empty PostgreSQL database, as a libpq URL")
	f.StringVar(&mkTPM, "master-key-tpm", "", "the TPM the master key is sealed to, if it is (as for serve)")
	f.BoolVar(&asJSON, "json", false, "print the result as JSON")
	return c
}
