package main

import (
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/keygate/keygate/internal/cli"
	"github.com/keygate/keygate/tpm"
)

// tpmFlags are the flags every `keygate tpm` subcommand shares.
type tpmFlags struct {
	spec   string
	rsa    bool
	asJSON bool
}

func newTPMCmd() *cobra.Command {
	var f tpmFlags
	c := &cobra.Command{
		Use:   "tpm",
		Short: "Show what enrollment needs from this machine's TPM: EK/AK public keys and PCRs",
		Long: `Read the TPM for enrollment at the key service: the endorsement key (EK)
keysvc seals unwrap keys to, the attestation key (AK) that signs quotes, and
the SHA-256 PCR values a policy is learned from.

--tpm names the TPM:
  /dev/tpmrm0     the VM's vTPM through the kernel's resource manager (default)
  swtpm:SOCKET    a swtpm started with --server type=unixio,path=SOCKET
                  --flags not-need-init,startup-clear
  sim             the in-process simulator, for trying things out: it is
                  fresh in every process, so its EK and AK differ on every run

Keys are ECC P-256 unless --rsa is given (RSA-2048). Nothing is written to
the TPM: keys are created as transient objects and flushed.`,
		Args: cobra.NoArgs,
		RunE: func(c *cobra.Command, args []string) error { return c.Help() },
	}
	pf := c.PersistentFlags()
	pf.StringVar(&f.spec, "tpm", tpm.DefaultDevice, "TPM to use: /dev/tpmrm0, swtpm:SOCKET or sim (sim's keys change on every run)")
	pf.BoolVar(&f.rsa, "rsa", false, "use the RSA-2048 EK/AK instead of ECC P-256")
	pf.BoolVar(&f.asJSON, "json", false, "print as JSON, for scripts")
	c.AddCommand(tpmInfoCmd(&f), tpmKeyCmd(&f, "ek"), tpmKeyCmd(&f, "ak"), tpmPCRsCmd(&f), tpmExtendCmd(&f))
	return c
}

func (f *tpmFlags) alg() tpm.Alg {
	if f.rsa {
		return tpm.RSA
	}
	return tpm.ECC
}

// withTPM opens the TPM named by --tpm, runs fn and closes it.
func (f *tpmFlags) withTPM(c *cobra.Command, fn func(*tpm.TPM) error) error {
	tp, err := tpm.Open(f.spec)
	if errors.Is(err, tpm.ErrBadSpec) {
		return cli.Usage(c, fmt.Errorf("--tpm: %w", err))
	}
	if err != nil {
		return err
	}
	err = fn(tp)
	if cerr := tp.Close(); err == nil {
		err = cerr
	}
	return err
}

// keyJSON is how `tpm ek`, `tpm ak` and `tpm info` print a key with --json.
type keyJSON struct {
	Alg         string `json:"alg"`
	PEM         string `json:"pem"`
	Fingerprint string `json:"sha256_fingerprint"`
	CertPEM     string `json:"cert_pem,omitempty"`
}

func keyView(k *tpm.PublicKey) (*keyJSON, error) {
	p, err := k.PEM()
	if err != nil {
		return nil, err
	}
	fp, err := k.Fingerprint()
	if err != nil {
		return nil, err
	}
	v := &keyJSON{Alg: k.Alg.String(), PEM: string(p), Fingerprint: fp}
	if k.Cert != nil {
		v.CertPEM = string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: k.Cert.Raw}))
	}
	return v, nil
}

func tpmKeyCmd(f *tpmFlags, which string) *cobra.Command {
	short := map[string]string{
		"ek": "Print the endorsement key (EK) public key as PEM, for 'keysvc vm enroll --ek-pub'",
		"ak": "Print the attestation key (AK) public key as PEM, for 'keysvc vm enroll --ak-pub'",
	}[which]
	return &cobra.Command{
		Use:   which + " [--tpm /dev/tpmrm0|swtpm:SOCKET|sim] [--rsa] [--json]",
		Short: short,
		Long: short + `.

Without --json, prints the PEM public key, then the TPM's certificate for it
(an EK certificate from the manufacturer or cloud) when it holds one.`,
		Args: cobra.NoArgs,
		RunE: func(c *cobra.Command, _ []string) error {
			return f.withTPM(c, func(tp *tpm.TPM) error {
				get := tp.EK
				if which == "ak" {
					get = tp.AK
				}
				k, err := get(f.alg())
				if err != nil {
					return err
				}
				v, err := keyView(k)
				if err != nil {
					return err
				}
				if f.asJSON {
					return printJSON(c.OutOrStdout(), v)
				}
				fmt.Fprint(c.OutOrStdout(), v.PEM+v.CertPEM)
				return nil
			})
		},
	}
}

func tpmInfoCmd(f *tpmFlags) *cobra.Command {
	return &cobra.Command{
		Use:   "info [--tpm /dev/tpmrm0|swtpm:SOCKET|sim] [--rsa] [--json]",
		Short: "Summarise the TPM (maker, firmware, spec, PCR banks, event log) with its EK and AK",
		Args:  cobra.NoArgs,
		RunE: func(c *cobra.Command, _ []string) error {
			return f.withTPM(c, func(tp *tpm.TPM) error {
				info, err := tp.Info()
				if err != nil {
					return err
				}
				ek, err := tp.EK(f.alg())
				if err != nil {
					return err
				}
				ak, err := tp.AK(f.alg())
				if err != nil {
					return err
				}
				out := struct {
					*tpm.Info
					Kind string   `json:"kind"`
					EK   *keyJSON `json:"ek"`
					AK   *keyJSON `json:"ak"`
				}{Info: info, Kind: info.Kind.String()}
				if out.EK, err = keyView(ek); err != nil {
					return err
				}
				if out.AK, err = keyView(ak); err != nil {
					return err
				}
				if f.asJSON {
					return printJSON(c.OutOrStdout(), out)
				}
				w := c.OutOrStdout()
				tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
				fmt.Fprintf(tw, "tpm:\t%s (%s)\n", info.Spec, info.Kind)
				fmt.Fprintf(tw, "manufacturer:\t%s\n", info.Manufacturer)
				if info.VendorString != "" {
					fmt.Fprintf(tw, "vendor:\t%s\n", info.VendorString)
				}
				fmt.Fprintf(tw, "firmware:\t%s (%s)\n", info.FirmwareVersion, info.FirmwareRaw)
				fmt.Fprintf(tw, "spec:\t%s\n", info.SpecVersion)
				fmt.Fprintf(tw, "pcr banks:\t%s\n", strings.Join(info.PCRBanks, ", "))
				if info.EventLog {
					fmt.Fprintf(tw, "event log:\tyes\n")
				} else {
					fmt.Fprintf(tw, "event log:\tnone: %s\n", info.EventLogNote)
				}
				for _, k := range []struct {
					name string
					v    *keyJSON
				}{{"ek", out.EK}, {"ak", out.AK}} {
					cert := "no certificate in the TPM"
					if k.v.CertPEM != "" {
						cert = "certificate in the TPM (see 'keygate tpm " + k.name + "')"
					}
					fmt.Fprintf(tw, "%s:\t%s, sha256 %s, %s\n", k.name, k.v.Alg, k.v.Fingerprint, cert)
				}
				if info.Kind == tpm.Simulator {
					fmt.Fprintf(tw, "note:\tthe simulator is fresh in every process: these keys change on every run\n")
				}
				if err := tw.Flush(); err != nil {
					return err
				}
				fmt.Fprintf(w, "\nEK public key:\n%s\nAK public key:\n%s", out.EK.PEM, out.AK.PEM)
				return nil
			})
		},
	}
}

func tpmPCRsCmd(f *tpmFlags) *cobra.Command {
	var list string
	c := &cobra.Command{
		Use:   "pcrs [--tpm /dev/tpmrm0|swtpm:SOCKET|sim] [--pcrs 0,1,2,7,15] [--json]",
		Short: "Print SHA-256 PCR values as hex, for learning or writing a policy",
		Long: `Print the SHA-256 bank's PCR values as hex, one "INDEX: HEX" line each, or
with --json as {"bank": "sha256", "pcrs": {"0": "HEX", …}}. --pcrs takes a
comma-separated list of indexes and ranges (0-23); the default is 0-15.`,
		Args: cobra.NoArgs,
		RunE: func(c *cobra.Command, _ []string) error {
			idx, err := parsePCRList(list)
			if err != nil {
				return cli.Usage(c, err)
			}
			return f.withTPM(c, func(tp *tpm.TPM) error {
				vals, err := tp.PCRs(idx...)
				if err != nil {
					return err
				}
				return printPCRs(c.OutOrStdout(), idx, vals.GetPcrs(), f.asJSON)
			})
		},
	}
	c.Flags().StringVar(&list, "pcrs", "0-15", "PCR indexes and ranges to print, e.g. 0,1,2,7,15 or 0-7,15")
	return c
}

func printPCRs(w io.Writer, idx []int, vals map[uint32][]byte, asJSON bool) error {
	if asJSON {
		out := struct {
			Bank string            `json:"bank"`
			PCRs map[string]string `json:"pcrs"`
		}{Bank: "sha256", PCRs: map[string]string{}}
		for _, i := range idx {
			out.PCRs[strconv.Itoa(i)] = hex.EncodeToString(vals[uint32(i)])
		}
		return printJSON(w, out)
	}
	for _, i := range idx {
		fmt.Fprintf(w, "%2d: %s\n", i, hex.EncodeToString(vals[uint32(i)]))
	}
	return nil
}

// parsePCRList parses "0,1,2,7,15" or "0-7,15" into sorted, distinct
// indexes in 0-23.
func parsePCRList(s string) ([]int, error) {
	bad := func(why string) error {
		return fmt.Errorf("invalid --pcrs %q: %s; use indexes and ranges in 0-%d, e.g. 0,1,2,7,15 or 0-7", s, why, tpm.NumPCRs-1)
	}
	var seen [tpm.NumPCRs]bool
	for _, part := range strings.Split(s, ",") {
		part = strings.TrimSpace(part)
		if part == "" {
			return nil, bad("empty entry")
		}
		lo, hi, isRange := strings.Cut(part, "-")
		a, err := strconv.Atoi(lo)
		if err != nil {
			return nil, bad(fmt.Sprintf("%q is not a number", lo))
		}
		b := a
		if isRange {
			if b, err = strconv.Atoi(hi); err != nil {
				return nil, bad(fmt.Sprintf("%q is not a number", hi))
			}
		}
		if a < 0 || b >= tpm.NumPCRs || a > b {
			return nil, bad(fmt.Sprintf("%s is out of range", part))
		}
		for i := a; i <= b; i++ {
			seen[i] = true
		}
	}
	var idx []int
	for i, ok := range seen {
		if ok {
			idx = append(idx, i)
		}
	}
	return idx, nil
}
