package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"path/filepath"

	"github.com/spf13/cobra"

	"github.com/keygate/keygate/internal/cli"
	"github.com/keygate/keygate/keysvc"
	"github.com/keygate/keygate/keysvc/masterkey"
	"github.com/keygate/keygate/tpm"
)

// The commands here work on the data directory itself, not through the admin
// API: they are for the operator of the host, and they must work when the
// admin token is lost.

// useMasterKeyTPM opens the TPM named by spec (if any) and routes the
// master key of dataDir through it until release is called, which also
// closes the TPM.
func useMasterKeyTPM(dataDir, spec string) (release func(), err error) {
	if spec == "" {
		return func() {}, nil
	}
	tp, err := tpm.Open(spec)
	if err != nil {
		return nil, fmt.Errorf("--master-key-tpm: %w", err)
	}
	done := masterkey.UseSealer(filepath.Join(dataDir, keysvc.MasterKeyFile), tp)
	return func() { done(); tp.Close() }, nil
}

func masterKeyCmd() *cobra.Command {
	mk := &cobra.Command{Use: "master-key", Short: "Manage the master key: seal it to a TPM (on the data directory); show and rotate it (through the admin API)"}
	var (
		data, spec string
		asJSON     bool
	)
	seal := &cobra.Command{
		Use:   "seal --data DIR --master-key-tpm TPM",
		Short: "Move the plain master key (DIR/master.key) into the host's TPM",
		Long: `seal seals DIR/master.key to the TPM (/dev/tpmrm0, swtpm:SOCKET), writes
DIR/master.key.tpm (0600), checks that it unseals to the same key, and then
removes DIR/master.key. From then on start the service with
--master-key-tpm TPM.

Stop the service first, and escrow a copy of master.key somewhere offline
before you run this: once sealed, the key exists only inside that TPM, and a
cleared or failed TPM would otherwise lose every key the service holds.`,
		Args: noArgs,
		RunE: func(c *cobra.Command, _ []string) error {
			if err := required(c, "data", "master-key-tpm"); err != nil {
				return err
			}
			if spec == "sim" {
				return cli.Usage(c, errors.New("--master-key-tpm sim is a new TPM in every process: a key sealed to it could never be unsealed by the service; use /dev/tpmrm0 or swtpm:SOCKET"))
			}
			tp, err := tpm.Open(spec)
			if err != nil {
				return fmt.Errorf("--master-key-tpm: %w", err)
			}
			defer tp.Close()
			path := filepath.Join(data, keysvc.MasterKeyFile)
			if err := masterkey.SealExisting(path, tp); err != nil {
				return err
			}
			if asJSON {
				return printJSON(c, map[string]any{"sealed_file": path + masterkey.SealedSuffix, "tpm": spec, "removed": path})
			}
			fmt.Fprintf(c.OutOrStdout(), "master key sealed to TPM %s: %s\nplain %s removed; start the service with --master-key-tpm %s\n",
				spec, path+masterkey.SealedSuffix, path, spec)
			return nil
		},
	}
	seal.Flags().StringVar(&data, "data", "", "the service's data directory")
	seal.Flags().StringVar(&spec, "master-key-tpm", "", "TPM to seal to: /dev/tpmrm0 or swtpm:SOCKET")
	seal.Flags().BoolVar(&asJSON, "json", false, "print the result as JSON")
	mk.AddCommand(seal)
	return mk
}

func adminTokenCmd() *cobra.Command {
	at := &cobra.Command{Use: "admin-token", Short: "Manage the admin token in a data directory"}
	var (
		data, spec string
		asJSON     bool
	)
	rotate := &cobra.Command{
		Use:   "rotate --data DIR [--master-key-tpm TPM]",
		Short: "Replace DIR/admin.token with a new token (audited); restart the service to use it",
		Long: `rotate writes a new random admin token to DIR/admin.token (0600, atomically)
and records the rotation in the audit chain. It works on the data directory,
so it also serves when the old token is lost or leaked.

The running service reads the token only when it starts: restart it after
rotating (or stop it first). Until then it still accepts the old token, and
refuses the new one. After the restart the old token gets 401.

If the master key is sealed to a TPM, pass the same --master-key-tpm as to
serve: the audit record is MAC'd with a key derived from it.`,
		Args: noArgs,
		RunE: func(c *cobra.Command, _ []string) error {
			if err := required(c, "data"); err != nil {
				return err
			}
			release, err := useMasterKeyTPM(data, spec)
			if err != nil {
				return err
			}
			defer release()
			path, err := keysvc.RotateAdminToken(context.Background(), data)
			if err != nil {
				return err
			}
			if asJSON {
				return printJSON(c, map[string]any{"admin_token_file": path, "audited": true, "restart_required": true})
			}
			fmt.Fprintf(c.OutOrStdout(), "new admin token written to %s (the rotation is audited)\nrestart keysvc serve now: until it restarts it accepts only the old token\n", path)
			return nil
		},
	}
	rotate.Flags().StringVar(&data, "data", "", "the service's data directory")
	rotate.Flags().StringVar(&spec, "master-key-tpm", "", "TPM the master key is sealed to, as given to serve")
	rotate.Flags().BoolVar(&asJSON, "json", false, "print the result as JSON")
	at.AddCommand(rotate)
	return at
}

func printJSON(c *cobra.Command, v any) error {
	enc := json.NewEncoder(c.OutOrStdout())
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}
