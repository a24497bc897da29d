package main

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"

	"github.com/spf13/cobra"

	"github.com/keygate/keygate/internal/cli"
	"github.com/keygate/keygate/tpm"
)

// tpmExtendCmd is `keygate tpm extend`: a measurement into a PCR, as a
// runtime measurement would make (and as the test guest's re-attestation
// scenario does).
func tpmExtendCmd(f *tpmFlags) *cobra.Command {
	var (
		pcr  int
		data string
	)
	c := &cobra.Command{
		Use:   "extend --pcr N --data TEXT [--tpm /dev/tpmrm0|swtpm:SOCKET|sim]",
		Short: "Extend a PCR with the SHA-256 of TEXT (a measurement), and print its new value",
		Long: `Extend PCR N, in every bank the TPM has, with the hash of TEXT, as a runtime
measurement would, and print the SHA-256 bank's new value. An extend lasts
until the machine reboots: extending a PCR that the key service's policy
names makes this boot's re-attestations (keygate boot --reattest) fail, and
the volume locks.`,
		Args: cobra.NoArgs,
		RunE: func(c *cobra.Command, _ []string) error {
			if !c.Flags().Changed("pcr") || !c.Flags().Changed("data") {
				return cli.Usagef(c, "--pcr and --data are required")
			}
			if pcr < 0 || pcr >= tpm.NumPCRs {
				return cli.Usagef(c, "--pcr %d: use 0 to %d", pcr, tpm.NumPCRs-1)
			}
			return f.withTPM(c, func(tp *tpm.TPM) error {
				if err := tp.Extend(pcr, []byte(data)); err != nil {
					return err
				}
				vals, err := tp.PCRs(pcr)
				if err != nil {
					return err
				}
				d := sha256.Sum256([]byte(data))
				fmt.Fprintf(c.OutOrStdout(), "extended PCR %d with sha256 %s\n", pcr, hex.EncodeToString(d[:]))
				return printPCRs(c.OutOrStdout(), []int{pcr}, vals.GetPcrs(), f.asJSON)
			})
		},
	}
	c.Flags().IntVar(&pcr, "pcr", -1, "PCR index, 0-23")
	c.Flags().StringVar(&data, "data", "", "the measured text; its SHA-256 is extended")
	return c
}
