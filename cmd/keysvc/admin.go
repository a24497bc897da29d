package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/url"
	"os"
	"strings"
	"time"

	kc "github.com/keygate/keygate/keysvc/client"

	"github.com/spf13/cobra"

	"github.com/keygate/keygate/attest"
	"github.com/keygate/keygate/internal/cli"
	"github.com/keygate/keygate/keysvc"
	"github.com/keygate/keygate/keysvc/api"
)

// client is the admin API client the admin subcommands share.
type client struct {
	server, tokenFile, ca string
	json                  bool
}

// call sends one admin request and returns the answer's body; a non-2xx
// answer becomes an error carrying the service's message and hint. --server
// may list several replicas, separated by commas.
func (cl *client) call(method, path string, body any) ([]byte, error) {
	server := firstNonEmpty(cl.server, os.Getenv("KEYSVC_SERVER"), "https://"+keysvc.DefaultAdminListen)
	tokenFile := firstNonEmpty(cl.tokenFile, os.Getenv("KEYSVC_TOKEN_FILE"))
	caFile := firstNonEmpty(cl.ca, os.Getenv("KEYSVC_CA"))
	if tokenFile == "" {
		return nil, errors.New("no admin token: pass --token-file DATA/admin.token or set KEYSVC_TOKEN_FILE")
	}
	if caFile == "" {
		// Never the system's roots: a certificate from any public CA, a
		// TLS-inspecting proxy's or one planted on this machine would
		// otherwise be handed the admin token.
		return nil, errors.New("no CA to trust: pass --ca DATA/ca.pem or set KEYSVC_CA (the admin token goes only to a server the key service's own CA signed)")
	}
	tok, err := os.ReadFile(tokenFile)
	if err != nil {
		return nil, fmt.Errorf("read admin token: %w", err)
	}
	cfg := kc.Config{URLs: kc.ParseURLs(server), Token: strings.TrimSpace(string(tok))}
	if cfg.CA, err = os.ReadFile(caFile); err != nil {
		return nil, fmt.Errorf("read CA: %w", err)
	}
	if _, err := kc.ParseCA(cfg.CA); err != nil {
		return nil, fmt.Errorf("CA file %s holds no PEM certificate (use DATA/ca.pem)", caFile)
	}
	c, err := kc.New(cfg)
	if err != nil {
		return nil, fmt.Errorf("bad --server %q: %v", server, err)
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var b []byte
	err = c.Do(ctx, method, path, "", body, &b)
	var se *kc.Error
	var ue *kc.UnreachableError
	switch {
	case err == nil:
		return b, nil
	case errors.Is(err, kc.ErrTLS):
		return nil, fmt.Errorf("%v (pass --ca DATA/ca.pem or set KEYSVC_CA)", err)
	case errors.As(err, &se) && se.Message != "" && se.Hint != "":
		return nil, fmt.Errorf("%s (%s): %s", se.Message, se.Status, se.Hint)
	case errors.As(err, &se) && se.Message != "":
		return nil, fmt.Errorf("%s (%s)", se.Message, se.Status)
	case errors.As(err, &se):
		return nil, fmt.Errorf("key service answered %s", se.Status)
	case errors.As(err, &ue):
		return nil, fmt.Errorf("reach key service: %w (is `keysvc serve` running? check --server)", err)
	}
	return nil, err
}

func firstNonEmpty(s ...string) string {
	for _, x := range s {
		if x != "" {
			return x
		}
	}
	return ""
}

// print writes the answer: indented JSON with --json, else text from human.
func (cl *client) print(c *cobra.Command, body []byte, human func(io.Writer) error) error {
	out := c.OutOrStdout()
	if cl.json || human == nil {
		var buf bytes.Buffer
		if err := json.Indent(&buf, body, "", "  "); err != nil {
			_, err = out.Write(body)
			return err
		}
		buf.WriteByte('\n')
		_, err := buf.WriteTo(out)
		return err
	}
	return human(out)
}

func adminCommands(cl *client) []*cobra.Command {
	cmds := []*cobra.Command{vmCmd(cl), volumeCmd(cl), policyCmd(cl), revokeCmd(cl), eraseCmd(cl), auditCmd(cl), eventsCmd(cl)}
	for _, c := range cmds {
		adminFlags(c, cl)
	}
	return cmds
}

// adminFlags gives c (and its subcommands) the flags that reach the admin API.
func adminFlags(c *cobra.Command, cl *client) {
	f := c.PersistentFlags()
	f.StringVar(&cl.server, "server", "", "admin API URL, or several replicas' separated by commas (env KEYSVC_SERVER; default https://"+keysvc.DefaultAdminListen+")")
	f.StringVar(&cl.tokenFile, "token-file", "", "admin token file, DATA/admin.token (env KEYSVC_TOKEN_FILE)")
	f.StringVar(&cl.ca, "ca", "", "the key service's CA certificate, DATA/ca.pem (env KEYSVC_CA); required: the token goes to no server it did not sign")
	f.BoolVar(&cl.json, "json", false, "print the service's JSON answer")
}

func required(c *cobra.Command, flags ...string) error {
	for _, f := range flags {
		if v, _ := c.Flags().GetString(f); v == "" {
			return cli.Usage(c, fmt.Errorf("--%s is required", f))
		}
	}
	return nil
}

func printVM(body []byte) func(io.Writer) error {
	return func(w io.Writer) error {
		var v api.VMInfo
		if err := json.Unmarshal(body, &v); err != nil {
			return err
		}
		fmt.Fprintf(w, "vm %s\n  ek sha256:   %s\n", v.Name, v.EKFingerprint)
		if v.AKFingerprint != "" {
			fmt.Fprintf(w, "  ak sha256:   %s\n", v.AKFingerprint)
		}
		fmt.Fprintf(w, "  revoked:     %v\n  learn armed: %v\n  policy:      %s\n", v.Revoked, v.LearnArmed, v.Policy)
		if v.Next != "" {
			fmt.Fprintf(w, "  next:        %s\n", v.Next)
		}
		return nil
	}
}

func vmCmd(cl *client) *cobra.Command {
	vm := &cobra.Command{Use: "vm", Short: "Enroll and show VMs"}
	var name, ekFile, ekCertFile, akFile string
	var prov bool
	enroll := &cobra.Command{
		Use:   "enroll --name N (--ek-pub FILE | --ek-cert FILE) [--ak-pub FILE]",
		Short: "Enroll a VM by its TPM's EK (and AK) public keys, PEM (keygate tpm ek|ak)",
		Args:  noArgs,
		RunE: func(c *cobra.Command, _ []string) error {
			if err := required(c, "name"); err != nil {
				return err
			}
			if ekFile == "" && ekCertFile == "" {
				return cli.Usage(c, errors.New("--ek-pub or --ek-cert is required"))
			}
			req := api.EnrollRequest{Name: name, ProvisioningAllowed: prov}
			if ekFile != "" {
				ek, err := os.ReadFile(ekFile)
				if err != nil {
					return fmt.Errorf("read EK: %w", err)
				}
				req.EKPub = string(ek)
			}
			if ekCertFile != "" {
				cert, err := os.ReadFile(ekCertFile)
				if err != nil {
					return fmt.Errorf("read EK certificate: %w", err)
				}
				req.EKCert = string(cert)
			}
			if akFile != "" {
				ak, err := os.ReadFile(akFile)
				if err != nil {
					return fmt.Errorf("read AK: %w", err)
				}
				req.AKPub = string(ak)
			}
			b, err := cl.call("POST", "/v1/admin/vms", req)
			if err != nil {
				return fmt.Errorf("enroll vm %s: %w", name, err)
			}
			return cl.print(c, b, printVM(b))
		},
	}
	enroll.Flags().StringVar(&name, "name", "", "VM name")
	enroll.Flags().StringVar(&ekFile, "ek-pub", "", "EK public key file, PEM")
	enroll.Flags().StringVar(&ekCertFile, "ek-cert", "", "EK certificate file, PEM, checked against the service's --ek-roots (instead of --ek-pub)")
	enroll.Flags().StringVar(&akFile, "ak-pub", "", "AK public key file, PEM (without it unlocks are refused)")
	enroll.Flags().BoolVar(&prov, "allow-provisioning", false, "let the VM have a UK created for a blank volume")
	var showName string
	show := &cobra.Command{
		Use: "show --name N", Short: "Show a VM", Args: noArgs,
		RunE: func(c *cobra.Command, _ []string) error {
			if err := required(c, "name"); err != nil {
				return err
			}
			b, err := cl.call("GET", "/v1/admin/vms/"+url.PathEscape(showName), nil)
			if err != nil {
				return fmt.Errorf("show vm %s: %w", showName, err)
			}
			return cl.print(c, b, printVM(b))
		},
	}
	show.Flags().StringVar(&showName, "name", "", "VM name")
	list := &cobra.Command{
		Use: "list", Short: "List VMs", Args: noArgs,
		RunE: func(c *cobra.Command, _ []string) error {
			b, err := cl.call("GET", "/v1/admin/vms", nil)
			if err != nil {
				return fmt.Errorf("list vms: %w", err)
			}
			return cl.print(c, b, func(w io.Writer) error {
				var vs []api.VMInfo
				if err := json.Unmarshal(b, &vs); err != nil {
					return err
				}
				for _, v := range vs {
					fmt.Fprintf(w, "%s\trevoked=%v\tak=%v", v.Name, v.Revoked, v.AKFingerprint != "")
					if v.Tampered != "" {
						fmt.Fprintf(w, "\tTAMPERED: %s", v.Tampered)
					}
					fmt.Fprintln(w)
				}
				return nil
			})
		},
	}
	var akName, akPath string
	setAK := &cobra.Command{
		Use:   "set-ak --name N --ak-pub FILE",
		Short: "Enroll (or replace) the AK of an enrolled VM, PEM (keygate tpm ak)",
		Args:  noArgs,
		RunE: func(c *cobra.Command, _ []string) error {
			if err := required(c, "name", "ak-pub"); err != nil {
				return err
			}
			ak, err := os.ReadFile(akPath)
			if err != nil {
				return fmt.Errorf("read AK: %w", err)
			}
			b, err := cl.call("PUT", "/v1/admin/vms/"+url.PathEscape(akName)+"/ak", api.SetAKRequest{AKPub: string(ak)})
			if err != nil {
				return fmt.Errorf("set AK of vm %s: %w", akName, err)
			}
			return cl.print(c, b, printVM(b))
		},
	}
	setAK.Flags().StringVar(&akName, "name", "", "VM name")
	setAK.Flags().StringVar(&akPath, "ak-pub", "", "AK public key file, PEM")
	vm.AddCommand(enroll, setAK, show, list)
	return vm
}

func printVolume(body []byte) func(io.Writer) error {
	return func(w io.Writer) error {
		var v api.VolumeInfo
		if err := json.Unmarshal(body, &v); err != nil {
			return err
		}
		fmt.Fprintf(w, "volume %s (vm %s) erased=%v%s\n", v.ID, v.VM, v.Erased, rotationNote(v))
		return nil
	}
}

func volumeCmd(cl *client) *cobra.Command {
	vol := &cobra.Command{Use: "volume", Short: "Create, import, list and rotate volumes"}
	for _, imp := range []bool{false, true} {
		var id, vm, keyFile string
		c := &cobra.Command{
			Use:   "create --id ID --vm N",
			Short: "Have the key service make a random 32-byte unwrap key for a volume",
			Args:  noArgs,
		}
		if imp {
			c.Use, c.Short = "import --id ID --vm N --key-file F", "Store a key file's bytes as a volume's unwrap key (as cryptsetup uses it)"
		}
		c.RunE = func(c *cobra.Command, _ []string) error {
			need := []string{"id", "vm"}
			if imp {
				need = append(need, "key-file")
			}
			if err := required(c, need...); err != nil {
				return err
			}
			req := api.VolumeRequest{ID: id, VM: vm}
			if imp {
				k, err := os.ReadFile(keyFile)
				if err != nil {
					return fmt.Errorf("read key file: %w", err)
				}
				if len(k) == 0 {
					return fmt.Errorf("key file %s is empty", keyFile)
				}
				if len(k) > api.MaxKeyFile {
					clear(k)
					return fmt.Errorf("key file %s is %d bytes; an unwrap key sealed to a TPM holds at most %d: %s",
						keyFile, len(k), api.MaxKeyFile, api.KeyFileHint)
				}
				req.Key = k
				defer clear(k)
			}
			b, err := cl.call("POST", "/v1/admin/volumes", req)
			if err != nil {
				return fmt.Errorf("volume %s: %w", id, err)
			}
			return cl.print(c, b, printVolume(b))
		}
		c.Flags().StringVar(&id, "id", "", "volume ID (the one in the volume's keygate token)")
		c.Flags().StringVar(&vm, "vm", "", "the VM allowed to unlock it")
		if imp {
			c.Flags().StringVar(&keyFile, "key-file", "", "key file; its bytes, as they are, are the keyslot passphrase")
		}
		vol.AddCommand(c)
	}
	var listVM string
	list := &cobra.Command{
		Use: "list [--vm N]", Short: "List volumes", Args: noArgs,
		RunE: func(c *cobra.Command, _ []string) error {
			b, err := cl.call("GET", "/v1/admin/volumes?vm="+url.QueryEscape(listVM), nil)
			if err != nil {
				return fmt.Errorf("list volumes: %w", err)
			}
			return cl.print(c, b, func(w io.Writer) error {
				var vs []api.VolumeInfo
				if err := json.Unmarshal(b, &vs); err != nil {
					return err
				}
				for _, v := range vs {
					fmt.Fprintf(w, "%s\tvm=%s\terased=%v%s", v.ID, v.VM, v.Erased, rotationNote(v))
					if v.Tampered != "" {
						fmt.Fprintf(w, "\tTAMPERED: %s", v.Tampered)
					}
					fmt.Fprintln(w)
				}
				return nil
			})
		},
	}
	list.Flags().StringVar(&listVM, "vm", "", "only this VM's volumes")
	vol.AddCommand(list, volumeRotateCmd(cl))
	return vol
}

func policyCmd(cl *client) *cobra.Command {
	pol := &cobra.Command{Use: "policy", Short: "Show, set or learn a VM's PCR policy"}
	var learnVM, setVM, showVM, file string
	learn := &cobra.Command{
		Use:   "learn --vm N",
		Short: "Arm learn mode: the VM's next valid attestation's boot PCRs become its policy",
		Args:  noArgs,
		RunE: func(c *cobra.Command, _ []string) error {
			if err := required(c, "vm"); err != nil {
				return err
			}
			b, err := cl.call("POST", "/v1/admin/vms/"+url.PathEscape(learnVM)+"/policy/learn", nil)
			if err != nil {
				return fmt.Errorf("arm learn mode: %w", err)
			}
			return cl.print(c, b, func(w io.Writer) error {
				_, err := fmt.Fprintf(w, "learn mode armed for %s: boot the VM once from a known-good image\n", learnVM)
				return err
			})
		},
	}
	learn.Flags().StringVar(&learnVM, "vm", "", "VM name")
	set := &cobra.Command{
		Use:   "set --vm N --file POLICY.json",
		Short: `Set the policy: {"pcrs": {"7": ["<64 hex>", ...]}, "secure_boot": true}`,
		Args:  noArgs,
		RunE: func(c *cobra.Command, _ []string) error {
			if err := required(c, "vm", "file"); err != nil {
				return err
			}
			raw, err := os.ReadFile(file)
			if err != nil {
				return fmt.Errorf("read policy: %w", err)
			}
			if _, err := attest.ParsePolicy(raw); err != nil {
				return err
			}
			b, err := cl.call("PUT", "/v1/admin/vms/"+url.PathEscape(setVM)+"/policy", json.RawMessage(raw))
			if err != nil {
				return fmt.Errorf("set policy: %w", err)
			}
			return cl.print(c, b, nil)
		},
	}
	set.Flags().StringVar(&setVM, "vm", "", "VM name")
	set.Flags().StringVar(&file, "file", "", "policy JSON file")
	show := &cobra.Command{
		Use: "show --vm N", Short: "Show the policy", Args: noArgs,
		RunE: func(c *cobra.Command, _ []string) error {
			if err := required(c, "vm"); err != nil {
				return err
			}
			b, err := cl.call("GET", "/v1/admin/vms/"+url.PathEscape(showVM)+"/policy", nil)
			if err != nil {
				return fmt.Errorf("show policy: %w", err)
			}
			return cl.print(c, b, nil)
		},
	}
	show.Flags().StringVar(&showVM, "vm", "", "VM name")
	pol.AddCommand(learn, set, show)
	return pol
}

func revokeCmd(cl *client) *cobra.Command {
	var vm string
	c := &cobra.Command{
		Use:   "revoke --vm N",
		Short: "Revoke a VM: its unlocks are refused and its sessions answer revoked",
		Args:  noArgs,
		RunE: func(c *cobra.Command, _ []string) error {
			if err := required(c, "vm"); err != nil {
				return err
			}
			b, err := cl.call("POST", "/v1/admin/vms/"+url.PathEscape(vm)+"/revoke", nil)
			if err != nil {
				return fmt.Errorf("revoke %s: %w", vm, err)
			}
			return cl.print(c, b, printVM(b))
		},
	}
	c.Flags().StringVar(&vm, "vm", "", "VM name")
	return c
}

func eraseCmd(cl *client) *cobra.Command {
	var id string
	c := &cobra.Command{
		Use:   "erase --volume ID",
		Short: "Crypto-erase a volume: destroy its unwrap key (irreversible)",
		Args:  noArgs,
		RunE: func(c *cobra.Command, _ []string) error {
			if err := required(c, "volume"); err != nil {
				return err
			}
			b, err := cl.call("POST", "/v1/admin/volumes/"+url.PathEscape(id)+"/erase", nil)
			if err != nil {
				return fmt.Errorf("erase %s: %w", id, err)
			}
			return cl.print(c, b, printVolume(b))
		},
	}
	c.Flags().StringVar(&id, "volume", "", "volume ID")
	return c
}

func auditCmd(cl *client) *cobra.Command {
	a := &cobra.Command{Use: "audit", Short: "Read and verify the audit chain"}
	verify := &cobra.Command{
		Use: "verify", Short: "Check the audit chain for edited, deleted or truncated records, and the stored VM and volume rows for changes made outside the service", Args: noArgs,
		RunE: func(c *cobra.Command, _ []string) error {
			b, err := cl.call("GET", "/v1/admin/audit/verify", nil)
			if err != nil {
				return fmt.Errorf("audit verify: %w", err)
			}
			var rep api.AuditVerifyResponse
			if err := json.Unmarshal(b, &rep); err != nil {
				return fmt.Errorf("audit verify: %v", err)
			}
			if err := cl.print(c, b, func(w io.Writer) error {
				fmt.Fprintf(w, "%d records, head at %d\n", rep.Records, rep.Head)
				for _, p := range rep.Problems {
					fmt.Fprintln(w, "  "+p)
				}
				return nil
			}); err != nil {
				return err
			}
			if !rep.OK {
				return fmt.Errorf("audit chain failed verification (%d problems): restore the database from a backup and investigate", len(rep.Problems)+rep.Omitted)
			}
			return nil
		},
	}
	var from uint64
	list := &cobra.Command{
		Use: "list [--from SEQ]", Short: "Print audit records (at most 1000 from SEQ)", Args: noArgs,
		RunE: func(c *cobra.Command, _ []string) error {
			b, err := cl.call("GET", fmt.Sprintf("/v1/admin/audit?from=%d", from), nil)
			if err != nil {
				return fmt.Errorf("audit list: %w", err)
			}
			return cl.print(c, b, nil)
		},
	}
	list.Flags().Uint64Var(&from, "from", 1, "first record")
	a.AddCommand(verify, list)
	return a
}
