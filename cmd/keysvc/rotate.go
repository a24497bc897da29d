package main

import (
	"fmt"
	"io"
	"net/url"

	"github.com/spf13/cobra"

	"github.com/keygate/keygate/keysvc/api"
)

// volumeRotateCmd is `keysvc volume rotate --id V`.
func volumeRotateCmd(cl *client) *cobra.Command {
	var id string
	c := &cobra.Command{
		Use:   "rotate --id ID",
		Short: "Give a volume a new unwrap key; the VM re-keys its image at its next unlock, without re-encrypting data",
		Long: `Makes a second unwrap key (UK) for the volume. The current UK stays until the
rotation completes: the VM's next unlock (keygate boot) receives both, adds a
keyslot under the new UK to its image, removes the old keyslot, and proves it
holds the new UK; the key service then destroys the old UK and records "rotate"
in the audit chain. Until then the volume shows "rotation: pending". No data is
re-encrypted, and a recovery keyslot is left alone.`,
		Args: noArgs,
		RunE: func(c *cobra.Command, _ []string) error {
			if err := required(c, "id"); err != nil {
				return err
			}
			b, err := cl.call("POST", "/v1/admin/volumes/"+url.PathEscape(id)+"/rotate", nil)
			if err != nil {
				return fmt.Errorf("rotate %s: %w", id, err)
			}
			return cl.print(c, b, func(w io.Writer) error {
				if err := printVolume(b)(w); err != nil {
					return err
				}
				fmt.Fprintln(w, "the VM completes the rotation at its next unlock (keygate boot)")
				return nil
			})
		},
	}
	c.Flags().StringVar(&id, "id", "", "volume ID")
	return c
}

// rotationNote is what a volume line says about a pending rotation.
func rotationNote(v api.VolumeInfo) string {
	if v.Rotation == "" {
		return ""
	}
	return "\trotation: " + v.Rotation
}
