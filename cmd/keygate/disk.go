package main

import (
	"encoding/json"
	"fmt"
	"io"
	"strconv"
	"strings"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/keygate/keygate/disk"
	"github.com/keygate/keygate/internal/cli"
	"github.com/keygate/keygate/internal/progress"
	"github.com/keygate/keygate/keymem"
)

func newDiskCmd() *cobra.Command {
	c := &cobra.Command{
		Use:   "disk",
		Short: "Create, inspect and use LUKS2-encrypted disk images in user space",
		Long: `Encrypted disk images, compatible with cryptsetup's LUKS2, opened entirely in
user space (no dm-crypt, no FUSE). --key-file means what it means to
cryptsetup: the file's bytes, as they are, are the keyslot passphrase, so the
same file opens the image with 'cryptsetup open --key-file F'.`,
		// cobra shows help and exits 0 for an unknown subcommand of a
		// non-root command; a typo must fail instead.
		Args: cobra.NoArgs,
		RunE: func(c *cobra.Command, args []string) error { return c.Help() },
	}
	c.AddCommand(diskCreateCmd(), diskMkfsCmd(), diskInfoCmd(), diskLsCmd(),
		diskPutCmd(), diskGetCmd(), diskCatCmd(), diskMkdirCmd(), diskRmCmd(),
		diskAddKeyCmd(), diskRemoveKeyCmd(), diskServeCmd())
	return c
}

// keyFlag registers the --key-file flag every command that opens a volume needs.
func keyFlag(c *cobra.Command, p *string) {
	c.Flags().StringVar(p, "key-file", "", "file whose bytes are the keyslot passphrase (as cryptsetup --key-file)")
}

// needKey reads the key file named by --key-file into locked memory,
// after making the process undumpable: every command that opens a volume
// holds its keys from here on (disk serve for as long as it serves), and
// another process of the same user must not read them out of /proc/PID/mem.
func needKey(c *cobra.Command, path string) (*disk.Key, error) {
	if path == "" {
		return nil, cli.Usage(c, fmt.Errorf("--key-file is required: name the file whose bytes unlock the volume"))
	}
	if err := keymem.HardenProcess(); err != nil {
		return nil, fmt.Errorf("protect the key: %w", err)
	}
	return disk.ReadKeyFile(path)
}

// parseSize reads sizes the way truncate(1) and cryptsetup users write them:
// a number of bytes with an optional binary suffix K, M, G or T.
func parseSize(s string) (int64, error) {
	t := strings.TrimSuffix(strings.ToUpper(strings.TrimSpace(s)), "B")
	t = strings.TrimSuffix(t, "I")
	mult := int64(1)
	if n := len(t); n > 0 {
		switch t[n-1] {
		case 'K':
			mult = 1 << 10
		case 'M':
			mult = 1 << 20
		case 'G':
			mult = 1 << 30
		case 'T':
			mult = 1 << 40
		}
		if mult > 1 {
			t = t[:n-1]
		}
	}
	v, err := strconv.ParseInt(t, 10, 64)
	if err != nil || v <= 0 || v > (1<<62)/mult {
		return 0, fmt.Errorf("invalid size %q: use a positive number of bytes with an optional K, M, G or T suffix, e.g. 256M", s)
	}
	return v * mult, nil
}

func diskCreateCmd() *cobra.Command {
	var (
		size, fsType, label, keyFile, keysvc, volume, pbkdf string
		sectorSize                                          int
		recovery, asJSON                                    bool
		ks                                                  keysvcCreate
	)
	c := &cobra.Command{
		Use:   "create IMAGE --size 256M (--key-file F | --keysvc URL --volume ID --vm NAME --ca FILE) [--fs ext4|fat32] [--sector-size 512|4096] [--label L] [--recovery]",
		Short: "Create a new LUKS2 image, optionally with a filesystem inside",
		Long: `Create IMAGE, a LUKS2 volume of --size bytes in total (the LUKS2 header and
keyslots take the first 16 MiB; the rest is data), encrypted with a fresh
random AES-256-XTS volume key. Keyslot 0 opens with --key-file. With --fs, a
filesystem is made inside. With --recovery, an extra argon2id keyslot gets a
random recovery passphrase that is printed once and never stored: write it
down, it is the break-glass path.

With --keysvc URL --volume ID --vm NAME --ca FILE instead of --key-file, a
fresh random unwrap key is made in locked memory, registered at the key
service for the VM (admin API: --admin URL or KEYSVC_SERVER, token from
--token-file or KEYSVC_TOKEN_FILE), and used as the keyslot's passphrase; a
keygate token in the header names the service, the volume and the CA, and
'keygate boot' unlocks the image by attestation.

IMAGE must not exist; on any failure nothing is left behind.`,
		Args: cli.ExactArgs("IMAGE"),
		RunE: func(c *cobra.Command, args []string) error {
			if size == "" {
				return cli.Usage(c, fmt.Errorf("--size is required, e.g. --size 256M"))
			}
			n, err := parseSize(size)
			if err != nil {
				return cli.Usage(c, err)
			}
			opts := disk.CreateOptions{Size: n, SectorSize: sectorSize, Label: label, Recovery: recovery}
			if opts.FS, err = parseFS(fsType, true); err != nil {
				return cli.Usage(c, err)
			}
			if opts.PBKDF, err = parsePBKDF(pbkdf); err != nil {
				return cli.Usage(c, err)
			}
			var res *disk.Created
			if keysvc != "" || volume != "" {
				if keyFile != "" {
					return cli.Usagef(c, "use either --key-file or --keysvc/--volume, not both")
				}
				if res, err = createWithKeysvc(c, args[0], keysvc, volume, opts, &ks); err != nil {
					return err
				}
				keyFile = "the unwrap key held by the key service (volume " + volume + ")"
			} else {
				key, err := needKey(c, keyFile)
				if err != nil {
					return err
				}
				defer key.Destroy()
				if res, err = disk.CreateImage(args[0], key, opts); err != nil {
					return err
				}
			}
			defer res.Wipe()
			if asJSON {
				out := struct {
					disk.Info
					KeySlot  int `json:"key_slot"`
					Recovery *struct {
						Slot       int    `json:"slot"`
						Passphrase string `json:"passphrase"`
					} `json:"recovery,omitempty"`
				}{Info: res.Info, KeySlot: res.KeySlot}
				if res.Recovery != nil {
					// Shown this once, as in the text output; it is stored nowhere.
					out.Recovery = &struct {
						Slot       int    `json:"slot"`
						Passphrase string `json:"passphrase"`
					}{res.RecoverySlot, string(res.Recovery.Bytes())}
				}
				return printJSON(c.OutOrStdout(), out)
			}
			out := c.OutOrStdout()
			fmt.Fprintf(out, "created %s: LUKS2, %s of data, %s, %d-byte sectors", args[0],
				progress.Bytes(res.Info.DataSize), res.Info.Segment.Cipher, res.Info.Segment.SectorSize)
			if opts.FS != "" {
				fmt.Fprintf(out, ", %s", opts.FS)
			}
			fmt.Fprintf(out, "\nkeyslot %d opens with %s\n", res.KeySlot, keyFile)
			if res.Recovery != nil {
				fmt.Fprintf(out, "recovery keyslot %d passphrase (shown once, store it offline):\n  ", res.RecoverySlot)
				out.Write(res.Recovery.Bytes())
				fmt.Fprintln(out)
			}
			return nil
		},
	}
	f := c.Flags()
	f.StringVar(&size, "size", "", "total image size, e.g. 256M or 10G (data = size - 16 MiB of header)")
	f.StringVar(&fsType, "fs", "", "filesystem to make inside: ext4 or fat32 (default: none)")
	f.IntVar(&sectorSize, "sector-size", 4096, "encryption sector size: 512 or 4096")
	f.StringVar(&label, "label", "", "LUKS2 label (and filesystem label)")
	f.StringVar(&pbkdf, "pbkdf", "argon2id", "key derivation for the --key-file keyslot: argon2id or pbkdf2")
	keyFlag(c, &keyFile)
	f.StringVar(&keysvc, "keysvc", "", "key service VM API URL, or several replicas' separated by commas, written into the keygate token (instead of --key-file)")
	f.StringVar(&volume, "volume", "", "volume ID at the key service (with --keysvc)")
	keysvcCreateFlags(c, &ks)
	f.BoolVar(&recovery, "recovery", false, "add an argon2id recovery keyslot and print its passphrase once")
	f.BoolVar(&asJSON, "json", false, "print the new header summary as JSON (with --recovery, the passphrase is in it, this once)")
	return c
}

func parseFS(s string, optional bool) (disk.FSType, error) {
	switch strings.ToLower(s) {
	case "":
		if optional {
			return "", nil
		}
		return "", fmt.Errorf("--fs is required: ext4 or fat32")
	case "ext4":
		return disk.Ext4, nil
	case "fat32", "vfat", "fat":
		return disk.FAT32, nil
	}
	return "", fmt.Errorf("unknown filesystem %q: use ext4 or fat32", s)
}

func parsePBKDF(s string) (disk.PBKDFKind, error) {
	switch strings.ToLower(s) {
	case "argon2id", "":
		return disk.Argon2id, nil
	case "pbkdf2":
		return disk.PBKDF2, nil
	}
	return "", fmt.Errorf("unknown --pbkdf %q: use argon2id (for passphrases) or pbkdf2 (for high-entropy key files)", s)
}

func diskMkfsCmd() *cobra.Command {
	var fsType, keyFile, label string
	c := &cobra.Command{
		Use:   "mkfs IMAGE --fs ext4|fat32 --key-file F",
		Short: "Make a filesystem inside an existing LUKS2 volume (e.g. one cryptsetup made)",
		Long: `Make a filesystem inside the data segment of IMAGE, which may have been made
by keygate or by 'cryptsetup luksFormat'. Anything already in the volume is lost.`,
		Args: cli.ExactArgs("IMAGE"),
		RunE: func(c *cobra.Command, args []string) error {
			t, err := parseFS(fsType, false)
			if err != nil {
				return cli.Usage(c, err)
			}
			key, err := needKey(c, keyFile)
			if err != nil {
				return err
			}
			defer key.Destroy()
			im, err := disk.OpenImage(args[0], key, true)
			if err != nil {
				return err
			}
			if err := im.Mkfs(t, label); err != nil {
				im.Close()
				return err
			}
			if err := im.Close(); err != nil {
				return err
			}
			fmt.Fprintf(c.OutOrStdout(), "made %s in %s\n", t, args[0])
			return nil
		},
	}
	c.Flags().StringVar(&fsType, "fs", "", "filesystem: ext4 or fat32")
	c.Flags().StringVar(&label, "label", "", "filesystem label")
	keyFlag(c, &keyFile)
	return c
}

func diskInfoCmd() *cobra.Command {
	var asJSON bool
	c := &cobra.Command{
		Use:   "info IMAGE [--json]",
		Short: "Summarise a LUKS2 header: keyslots, tokens, cipher, layout (never a secret)",
		Args:  cli.ExactArgs("IMAGE"),
		RunE: func(c *cobra.Command, args []string) error {
			info, err := disk.Inspect(args[0])
			if err != nil {
				return err
			}
			if asJSON {
				return printJSON(c.OutOrStdout(), info)
			}
			printInfo(c.OutOrStdout(), args[0], info)
			return nil
		},
	}
	c.Flags().BoolVar(&asJSON, "json", false, "print as JSON")
	return c
}

func printJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func printInfo(w io.Writer, path string, in disk.Info) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintf(tw, "image:\t%s\n", path)
	fmt.Fprintf(tw, "format:\tLUKS%d, header seqid %d\n", in.Version, in.SeqID)
	fmt.Fprintf(tw, "uuid:\t%s\n", in.UUID)
	if in.Label != "" {
		fmt.Fprintf(tw, "label:\t%s\n", in.Label)
	}
	if s := in.Segment; s != nil {
		fmt.Fprintf(tw, "data:\t%s at offset %d, %s, %d-byte sectors\n", progress.Bytes(in.DataSize), s.Offset, s.Cipher, s.SectorSize)
	} else {
		fmt.Fprintf(tw, "data:\tunreadable by keygate: %s\n", in.SegmentError)
	}
	for _, h := range in.Headers {
		state := "ok"
		if !h.OK {
			state = "BAD: " + h.Problem + " (repaired by the next header write)"
		}
		fmt.Fprintf(tw, "%s header:\tat %d, seqid %d, %s\n", h.Copy, h.Offset, h.SeqID, state)
	}
	for _, k := range in.Keyslots {
		desc := k.Type
		if p := k.PBKDF; p != nil {
			switch p.Type {
			case "pbkdf2":
				desc += fmt.Sprintf(", pbkdf2-%s %d iterations", p.Hash, p.Iterations)
			default:
				desc += fmt.Sprintf(", %s t=%d m=%s p=%d", p.Type, p.Time, progress.Bytes(int64(p.MemoryKiB)<<10), p.Parallel)
			}
		}
		fmt.Fprintf(tw, "keyslot %d:\t%s, priority %s\n", k.ID, desc, k.Priority)
	}
	for _, t := range in.Tokens {
		fmt.Fprintf(tw, "token %d:\t%s, keyslots %v\n", t.ID, t.Type, t.Keyslots)
		if t.CASHA256 != "" {
			fmt.Fprintf(tw, "  key service:\t%s, volume %s, CA sha256 %s\n", strings.Join(t.KeysvcURLs, ","), t.VolumeID, t.CASHA256)
		}
	}
	if len(in.Requirements) > 0 {
		fmt.Fprintf(tw, "requirements:\t%v\n", in.Requirements)
	}
	tw.Flush()
}
