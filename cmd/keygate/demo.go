package main

import (
	"bytes"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	"github.com/spf13/cobra"

	"github.com/keygate/keygate/disk"
)

func newDemoCmd() *cobra.Command {
	var dir string
	var keep bool
	c := &cobra.Command{
		Use:   "demo",
		Short: "Run the whole story on embedded defaults, in seconds",
		Long: `Walk through keygate on this machine, for real: create a LUKS2 image with an
ext4 filesystem, write and read a file through the user-space AES-XTS layer,
show that the image holds only ciphertext, have cryptsetup (if installed)
open the same image with the same key file, then crypto-erase it by
destroying its only keyslot. Work happens in a temporary directory, removed
afterwards unless --keep.

The key service, attestation and the monitor join the demo as they land.`,
		Args: cobra.NoArgs,
		RunE: func(c *cobra.Command, _ []string) error {
			if dir == "" {
				d, err := os.MkdirTemp("", "keygate-demo-")
				if err != nil {
					return fmt.Errorf("make demo directory: %w", err)
				}
				dir = d
				if !keep {
					defer os.RemoveAll(d)
				}
			}
			return runDemo(c.OutOrStdout(), dir)
		},
	}
	c.Flags().StringVar(&dir, "dir", "", "work in this directory instead of a temporary one (kept)")
	c.Flags().BoolVar(&keep, "keep", false, "keep the temporary directory")
	return c
}

func runDemo(out io.Writer, dir string) error {
	step := func(format string, a ...any) { fmt.Fprintf(out, "\n==> "+format+"\n", a...) }
	img := filepath.Join(dir, "volume.img")
	keyPath := filepath.Join(dir, "volume.key")

	step("a random 32-byte key file stands in for the key service's unwrap key")
	raw := make([]byte, 32)
	if _, err := rand.Read(raw); err != nil {
		return err
	}
	err := os.WriteFile(keyPath, raw, 0o600)
	clear(raw)
	if err != nil {
		return fmt.Errorf("write key file: %w", err)
	}
	fmt.Fprintf(out, "    %s (0600)\n", keyPath)
	key, err := disk.ReadKeyFile(keyPath)
	if err != nil {
		return err
	}
	defer key.Destroy()

	step("create a 64 MiB LUKS2 image with ext4 inside (keyslot: pbkdf2, as for a high-entropy key)")
	res, err := disk.CreateImage(img, key, disk.CreateOptions{Size: 64 << 20, SectorSize: 4096, FS: disk.Ext4, Label: "demo", PBKDF: disk.PBKDF2})
	if err != nil {
		return err
	}
	res.Wipe()
	info, err := disk.Inspect(img)
	if err != nil {
		return err
	}
	printInfo(indent(out), img, info)

	secret := []byte("Quarterly numbers, not for the cloud provider's eyes.\n")
	step("write /reports/q3.txt through go-diskfs -> ext4 -> AES-XTS -> image file")
	im, err := disk.OpenImage(img, key, true)
	if err != nil {
		return err
	}
	fsys, err := im.FS()
	if err == nil {
		err = fsys.Mkdir("/reports")
	}
	if err == nil {
		err = fsys.Put("/reports/q3.txt", bytes.NewReader(secret), int64(len(secret)))
	}
	if cerr := im.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return err
	}

	step("read it back in a fresh session")
	im, err = disk.OpenImage(img, key, false)
	if err != nil {
		return err
	}
	var got bytes.Buffer
	if fsys, err = im.FS(); err == nil {
		_, err = fsys.Get("/reports/q3.txt", &got)
	}
	im.Close()
	if err != nil {
		return err
	}
	fmt.Fprintf(out, "    %q\n", got.String())
	if !bytes.Equal(got.Bytes(), secret) {
		return errors.New("demo: read back different bytes than were written")
	}

	step("the image file holds only ciphertext")
	whole, err := os.ReadFile(img)
	if err != nil {
		return err
	}
	found := bytes.Contains(whole, secret[:20]) || bytes.Contains(whole, []byte("q3.txt"))
	fmt.Fprintf(out, "    plaintext or file name found in %d bytes of image: %v\n", len(whole), found)
	if found {
		return errors.New("demo: plaintext is visible in the image file")
	}

	step("cryptsetup opens the very same image with the very same key file")
	if cs, err := exec.LookPath("cryptsetup"); err != nil {
		fmt.Fprintln(out, "    cryptsetup is not installed here (apt-get install cryptsetup-bin); skipping this step")
	} else {
		cmd := exec.Command(cs, "open", "--test-passphrase", "--key-file", keyPath, img)
		if b, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("cryptsetup open --test-passphrase failed: %v: %s", err, b)
		}
		fmt.Fprintln(out, "    cryptsetup open --test-passphrase --key-file volume.key volume.img: ok")
	}

	step("crypto-erase: destroy the only keyslot; the data is now unrecoverable")
	if err := disk.RemoveKey(img, key, res.KeySlot, true); err != nil {
		return err
	}
	_, err = disk.OpenImage(img, key, false)
	fmt.Fprintf(out, "    opening again: %v\n", err)
	if err == nil {
		return errors.New("demo: the image still opened after its last keyslot was destroyed")
	}
	fmt.Fprintln(out, "\ndemo complete.")
	return nil
}

// indent prefixes every line written through it with four spaces.
func indent(w io.Writer) io.Writer { return &indenter{w: w, bol: true} }

type indenter struct {
	w   io.Writer
	bol bool
}

func (i *indenter) Write(p []byte) (int, error) {
	var b strings.Builder
	for _, c := range string(p) {
		if i.bol {
			b.WriteString("    ")
		}
		b.WriteRune(c)
		i.bol = c == '\n'
	}
	_, err := io.WriteString(i.w, b.String())
	return len(p), err
}
