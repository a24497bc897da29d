package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/keygate/keygate/keysvc/api"
	"github.com/keygate/keygate/keysvc/masterkey/hsm"
)

// pkcs11Config builds the HSM settings of serve from its flags, or nil if
// --master-key-pkcs11 is not given. The PIN is read from pinFile; the
// caller wipes cfg.PIN once the service has started.
func pkcs11Config(uri, module, pinFile string) (*hsm.Config, error) {
	if uri == "" {
		if module != "" || pinFile != "" {
			return nil, errors.New("--pkcs11-module and --pkcs11-pin-file go with --master-key-pkcs11 'pkcs11:token=LABEL;object=NAME'")
		}
		return nil, nil
	}
	u, err := hsm.ParseURI(uri)
	if err != nil {
		return nil, fmt.Errorf("--master-key-pkcs11: %w", err)
	}
	if pinFile == "" {
		if p, ok := strings.CutPrefix(u.PINSource, "file:"); ok {
			pinFile = p
		}
	}
	if pinFile == "" {
		return nil, errors.New("--master-key-pkcs11 needs --pkcs11-pin-file F: a 0600 file holding the token's user PIN")
	}
	fi, err := os.Stat(pinFile)
	if err != nil {
		return nil, fmt.Errorf("--pkcs11-pin-file: %w", err)
	}
	if fi.Mode().Perm()&0o077 != 0 {
		return nil, fmt.Errorf("--pkcs11-pin-file %s has mode %04o: the PIN must not be readable by others (chmod 600 %s)", pinFile, fi.Mode().Perm(), pinFile)
	}
	pin, err := os.ReadFile(pinFile)
	if err != nil {
		return nil, fmt.Errorf("--pkcs11-pin-file: %w", err)
	}
	n := len(pin)
	for n > 0 && (pin[n-1] == '\n' || pin[n-1] == '\r') {
		n--
	}
	clear(pin[n:])
	if n == 0 {
		return nil, fmt.Errorf("--pkcs11-pin-file %s is empty: put the token's user PIN in it", pinFile)
	}
	return &hsm.Config{Module: module, URI: u, PIN: pin[:n]}, nil
}

// masterKeyAdminCmds are the master-key subcommands that go through the
// admin API.
func masterKeyAdminCmds(cl *client) []*cobra.Command {
	show := &cobra.Command{
		Use: "show", Short: "Show the master key's fingerprint and kind, and any rotation under way", Args: noArgs,
		RunE: func(c *cobra.Command, _ []string) error {
			b, err := cl.call("GET", "/v1/admin/master-key", nil)
			if err != nil {
				return fmt.Errorf("master-key show: %w", err)
			}
			return cl.print(c, b, printMasterKey(b))
		},
	}
	var noWait bool
	rotate := &cobra.Command{
		Use:   "rotate",
		Short: "Re-seal every unwrap key and re-MAC every row under a new master key, online (audited)",
		Long: `rotate asks the running service to move to a new master key: it makes the
key (master.key.next, or the token object NAME.next), then re-seals every
volume's unwrap key and re-MACs every VM and volume row under it in batches
while it keeps serving, installs it in place of the old key, and wipes the
old one. Each step is in the audit chain (master-key-rotate records).

A rotation interrupted by a crash or a stop resumes when the service starts
again; run this command again to resume one that stopped on an error.
Unless --no-wait, it waits for the rotation to finish. Back up the new key
(master.key) afterwards: the old backup no longer opens anything.`,
		Args: noArgs,
		RunE: func(c *cobra.Command, _ []string) error {
			b, err := cl.call("POST", "/v1/admin/master-key/rotate", nil)
			if err != nil {
				return fmt.Errorf("master-key rotate: %w", err)
			}
			for !noWait {
				var info api.MasterKeyInfo
				if err := json.Unmarshal(b, &info); err != nil {
					return fmt.Errorf("master-key rotate: %w", err)
				}
				if info.Rotation == nil {
					break
				}
				if !info.Rotation.Running && info.Rotation.Error != "" {
					return fmt.Errorf("master-key rotate: stopped after %d VMs and %d volumes: %s (fix it and run the command again to resume)",
						info.Rotation.VMs, info.Rotation.Volumes, info.Rotation.Error)
				}
				time.Sleep(250 * time.Millisecond)
				if b, err = cl.call("GET", "/v1/admin/master-key", nil); err != nil {
					return fmt.Errorf("master-key rotate: %w", err)
				}
			}
			return cl.print(c, b, printMasterKey(b))
		},
	}
	rotate.Flags().BoolVar(&noWait, "no-wait", false, "return once the rotation has begun (follow it with `keysvc master-key show`)")
	cmds := []*cobra.Command{show, rotate}
	for _, c := range cmds {
		adminFlags(c, cl)
	}
	return cmds
}

func printMasterKey(body []byte) func(io.Writer) error {
	return func(w io.Writer) error {
		var info api.MasterKeyInfo
		if err := json.Unmarshal(body, &info); err != nil {
			return err
		}
		fmt.Fprintf(w, "master key %s (%s)\n", info.Fingerprint, info.Kind)
		if r := info.Rotation; r != nil {
			state := "running"
			if !r.Running {
				state = "stopped: " + r.Error
			}
			fmt.Fprintf(w, "rotation %s -> %s since %s: %d VMs and %d volumes re-keyed, %s\n",
				r.OldKey, r.NewKey, r.Started.Format(time.RFC3339), r.VMs, r.Volumes, state)
		}
		return nil
	}
}
