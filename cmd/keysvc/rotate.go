package main

import (
	"encoding/json"
	"fmt"
	"io"
	"net/url"

	"github.com/spf13/cobra"

	"github.com/keygate/keygate/keysvc/api"
)

// volumeRotateCmd is `keysvc volume rotate --id V`.
func volumeRotateCmd(cl *client) *cobra.Command {
	var (
		id     string
		cancel bool
	)
	c := &cobra.Command{
		Use:   "rotate --id ID [--cancel]",
		Short: "Give a volume a new unwrap key; the VM re-keys its image at its next unlock, without re-encrypting data",
		Long: `Makes a second unwrap key (UK) for the volume. The current UK stays until the
rotation completes: the VM's next unlock (keygate boot) receives both, adds a
keyslot under the new UK to its image, removes the old keyslot, and proves it
holds the new UK; the key service then destroys the old UK and records "rotate"
in the audit chain. Until then the volume shows "rotation: pending". No data is
re-encrypted, and a recovery keyslot is left alone.

--cancel cancels a pending rotation. If the new UK was never released to the
VM it is destroyed at once. If it was, the VM may have re-keyed its image to
it, so both keys stay until the VM's next boot says which one its image holds
("rotation: cancelling"): a VM whose image still opens with the current UK
drops the new keyslot and the service destroys the new UK; one whose image
opens with the new UK alone completes the rotation instead. Either way the
image keeps a key the service holds. Once the VM has confirmed a rotation
there is nothing left to cancel: rotate again to move to another key.`,
		Args: noArgs,
		RunE: func(c *cobra.Command, _ []string) error {
			if err := required(c, "id"); err != nil {
				return err
			}
			if cancel {
				return cancelRotation(c, cl, id)
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
	c.Flags().BoolVar(&cancel, "cancel", false, "cancel the volume's pending rotation (audited)")
	return c
}

// cancelRotation is `keysvc volume rotate --id V --cancel`.
func cancelRotation(c *cobra.Command, cl *client, id string) error {
	b, err := cl.call("POST", "/v1/admin/volumes/"+url.PathEscape(id)+"/rotate/cancel", nil)
	if err != nil {
		return fmt.Errorf("cancel rotation of %s: %w", id, err)
	}
	return cl.print(c, b, func(w io.Writer) error {
		if err := printVolume(b)(w); err != nil {
			return err
		}
		var v api.VolumeInfo
		if json.Unmarshal(b, &v) == nil && v.Rotation == api.RotationCancelling {
			fmt.Fprintln(w, "the new key was released to the VM already: the VM ends the cancel at its next boot (keygate boot), keeping the key its image holds")
			return nil
		}
		fmt.Fprintln(w, "rotation cancelled; the new key is destroyed")
		return nil
	})
}

// rotationNote is what a volume line says about a pending rotation.
func rotationNote(v api.VolumeInfo) string {
	if v.Rotation == "" {
		return ""
	}
	return "\trotation: " + v.Rotation
}
