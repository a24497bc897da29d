package main

import (
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/keygate/keygate/disk"
	"github.com/keygate/keygate/internal/cli"
	"github.com/keygate/keygate/internal/progress"
)

// withFS opens IMAGE with the key file, runs fn on its filesystem and closes
// everything, flushing writes, whatever fn returns.
func withFS(c *cobra.Command, image, keyFile string, writable bool, fn func(*disk.FS) error) (err error) {
	key, err := needKey(c, keyFile)
	if err != nil {
		return err
	}
	defer key.Destroy()
	im, err := disk.OpenImage(image, key, writable)
	if err != nil {
		return err
	}
	defer func() {
		if cerr := im.Close(); err == nil && cerr != nil {
			err = fmt.Errorf("close %s: %w", image, cerr)
		}
	}()
	fsys, err := im.FS()
	if err != nil {
		return err
	}
	return fn(fsys)
}

func diskLsCmd() *cobra.Command {
	var keyFile string
	var asJSON bool
	c := &cobra.Command{
		Use:   "ls IMAGE [PATH] --key-file F [--json]",
		Short: "List a directory (default /) inside the encrypted filesystem",
		Args: func(c *cobra.Command, args []string) error {
			if len(args) < 1 || len(args) > 2 {
				return cli.Usage(c, fmt.Errorf("ls needs IMAGE and optionally PATH, got %d arguments", len(args)))
			}
			return nil
		},
		RunE: func(c *cobra.Command, args []string) error {
			dir := "/"
			if len(args) == 2 {
				dir = args[1]
			}
			return withFS(c, args[0], keyFile, false, func(fsys *disk.FS) error {
				ents, err := fsys.ReadDir(dir)
				if err != nil {
					return err
				}
				if asJSON {
					type entry struct {
						Name    string    `json:"name"`
						Size    int64     `json:"size"`
						Dir     bool      `json:"dir"`
						Mode    string    `json:"mode"`
						ModTime time.Time `json:"mtime"`
					}
					out := make([]entry, 0, len(ents))
					for _, e := range ents {
						out = append(out, entry{e.Name, e.Size, e.IsDir, e.Mode.String(), e.ModTime.UTC()})
					}
					return printJSON(c.OutOrStdout(), out)
				}
				tw := tabwriter.NewWriter(c.OutOrStdout(), 0, 4, 2, ' ', tabwriter.AlignRight)
				for _, e := range ents {
					name := e.Name
					if e.IsDir {
						name += "/"
					}
					fmt.Fprintf(tw, "%s\t%d\t %s\t %s\n", e.Mode, e.Size, e.ModTime.UTC().Format("2006-01-02 15:04"), name)
				}
				return tw.Flush()
			})
		},
	}
	keyFlag(c, &keyFile)
	c.Flags().BoolVar(&asJSON, "json", false, "print as JSON")
	return c
}

func diskPutCmd() *cobra.Command {
	var keyFile string
	c := &cobra.Command{
		Use:   "put IMAGE LOCAL PATH --key-file F",
		Short: "Copy a local file (or - for stdin) into the encrypted filesystem",
		Long: `Copy LOCAL (or standard input, for -) to PATH inside IMAGE. The parent
directory must exist (see mkdir). An existing file at PATH is replaced only
once the new content is completely written: if the filesystem fills up, the
old file is left as it was.`,
		Args: cli.ExactArgs("IMAGE", "LOCAL", "PATH"),
		RunE: func(c *cobra.Command, args []string) error {
			var r io.Reader = c.InOrStdin()
			size := int64(-1)
			if args[1] != "-" {
				f, err := os.Open(args[1])
				if err != nil {
					return fmt.Errorf("open local file: %w", err)
				}
				defer f.Close()
				st, err := f.Stat()
				if err != nil {
					return fmt.Errorf("stat local file: %w", err)
				}
				if st.IsDir() {
					return fmt.Errorf("%s is a directory: put copies one file; use mkdir and put for each file", args[1])
				}
				r, size = f, st.Size()
			}
			return withFS(c, args[0], keyFile, true, func(fsys *disk.FS) error {
				bar := progress.New(os.Stderr, "put "+filepath.Base(args[2]), size)
				defer bar.Done()
				return fsys.Put(args[2], io.TeeReader(r, bar), size)
			})
		},
	}
	keyFlag(c, &keyFile)
	return c
}

func diskGetCmd() *cobra.Command {
	var keyFile string
	c := &cobra.Command{
		Use:   "get IMAGE PATH LOCAL --key-file F",
		Short: "Copy a file out of the encrypted filesystem to LOCAL (or - for stdout)",
		Long: `Copy PATH inside IMAGE to LOCAL, or to standard output for -. LOCAL is
written to a temporary file beside it and renamed into place, so a failed
copy never leaves a half-written LOCAL.`,
		Args: cli.ExactArgs("IMAGE", "PATH", "LOCAL"),
		RunE: func(c *cobra.Command, args []string) error {
			return withFS(c, args[0], keyFile, false, func(fsys *disk.FS) error {
				if args[2] == "-" {
					_, err := fsys.Get(args[1], c.OutOrStdout())
					return err
				}
				return getToFile(fsys, args[1], args[2])
			})
		},
	}
	keyFlag(c, &keyFile)
	return c
}

func getToFile(fsys *disk.FS, path, local string) error {
	st, err := fsys.Stat(path)
	if err != nil {
		return err
	}
	tmp, err := os.CreateTemp(filepath.Dir(local), "."+filepath.Base(local)+".keygate-*")
	if err != nil {
		return fmt.Errorf("create local file: %w", err)
	}
	defer os.Remove(tmp.Name()) // a no-op once renamed
	bar := progress.New(os.Stderr, "get "+filepath.Base(path), st.Size)
	_, err = fsys.Get(path, io.MultiWriter(tmp, bar))
	bar.Done()
	if err == nil {
		err = tmp.Sync()
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("write %s: %w", local, err)
	}
	return os.Rename(tmp.Name(), local)
}

func diskCatCmd() *cobra.Command {
	var keyFile string
	c := &cobra.Command{
		Use:   "cat IMAGE PATH --key-file F",
		Short: "Print a file from the encrypted filesystem",
		Args:  cli.ExactArgs("IMAGE", "PATH"),
		RunE: func(c *cobra.Command, args []string) error {
			return withFS(c, args[0], keyFile, false, func(fsys *disk.FS) error {
				_, err := fsys.Get(args[1], c.OutOrStdout())
				return err
			})
		},
	}
	keyFlag(c, &keyFile)
	return c
}

func diskMkdirCmd() *cobra.Command {
	var keyFile string
	c := &cobra.Command{
		Use:   "mkdir IMAGE PATH --key-file F",
		Short: "Make a directory (and its parents) in the encrypted filesystem",
		Args:  cli.ExactArgs("IMAGE", "PATH"),
		RunE: func(c *cobra.Command, args []string) error {
			return withFS(c, args[0], keyFile, true, func(fsys *disk.FS) error { return fsys.Mkdir(args[1]) })
		},
	}
	keyFlag(c, &keyFile)
	return c
}

func diskRmCmd() *cobra.Command {
	var keyFile string
	c := &cobra.Command{
		Use:   "rm IMAGE PATH --key-file F",
		Short: "Remove a file or an empty directory from the encrypted filesystem",
		Args:  cli.ExactArgs("IMAGE", "PATH"),
		RunE: func(c *cobra.Command, args []string) error {
			return withFS(c, args[0], keyFile, true, func(fsys *disk.FS) error { return fsys.Remove(args[1]) })
		},
	}
	keyFlag(c, &keyFile)
	return c
}

func diskAddKeyCmd() *cobra.Command {
	var keyFile, newKeyFile, pbkdf string
	c := &cobra.Command{
		Use:   "add-key IMAGE --key-file F --new-key-file G [--pbkdf argon2id|pbkdf2]",
		Short: "Add a keyslot that opens with G, authorised by an existing key F",
		Args:  cli.ExactArgs("IMAGE"),
		RunE: func(c *cobra.Command, args []string) error {
			kind, err := parsePBKDF(pbkdf)
			if err != nil {
				return cli.Usage(c, err)
			}
			if newKeyFile == "" {
				return cli.Usage(c, fmt.Errorf("--new-key-file is required: name the file whose bytes will open the new keyslot"))
			}
			key, err := needKey(c, keyFile)
			if err != nil {
				return err
			}
			defer key.Destroy()
			newKey, err := disk.ReadKeyFile(newKeyFile)
			if err != nil {
				return err
			}
			defer newKey.Destroy()
			slot, err := disk.AddKey(args[0], key, newKey, kind)
			if err != nil {
				return err
			}
			fmt.Fprintf(c.OutOrStdout(), "added keyslot %d to %s\n", slot, args[0])
			return nil
		},
	}
	keyFlag(c, &keyFile)
	c.Flags().StringVar(&newKeyFile, "new-key-file", "", "file whose bytes will open the new keyslot")
	c.Flags().StringVar(&pbkdf, "pbkdf", "argon2id", "key derivation for the new keyslot: argon2id or pbkdf2")
	return c
}

func diskRemoveKeyCmd() *cobra.Command {
	var keyFile string
	var slot int
	var force bool
	c := &cobra.Command{
		Use:   "remove-key IMAGE --key-file F --slot N [--force]",
		Short: "Wipe keyslot N, authorised by a key that opens the volume",
		Long: `Wipe keyslot N of IMAGE. --key-file must open the volume (through any
keyslot), so that a typo cannot lock you out. Removing the last keyslot makes
the volume unrecoverable and is refused unless --force is given.`,
		Args: cli.ExactArgs("IMAGE"),
		RunE: func(c *cobra.Command, args []string) error {
			if !c.Flags().Changed("slot") {
				return cli.Usage(c, fmt.Errorf("--slot is required: see 'keygate disk info %s' for the keyslots", args[0]))
			}
			key, err := needKey(c, keyFile)
			if err != nil {
				return err
			}
			defer key.Destroy()
			if err := disk.RemoveKey(args[0], key, slot, force); err != nil {
				return err
			}
			fmt.Fprintf(c.OutOrStdout(), "removed keyslot %s from %s\n", strconv.Itoa(slot), args[0])
			return nil
		},
	}
	keyFlag(c, &keyFile)
	c.Flags().IntVar(&slot, "slot", -1, "keyslot number to wipe")
	c.Flags().BoolVar(&force, "force", false, "allow removing the last keyslot (destroys access to the data)")
	return c
}
