package boot

import (
	"context"
	"errors"
	"fmt"
	"log/slog"

	"github.com/keygate/keygate/disk"
	"github.com/keygate/keygate/keysvc/api"
	"github.com/keygate/keygate/tpm"
)

// A rotation the operator cancelled after its pending UK was released
// (docs/protocol.md, "Cancelling a rotation"). The service keeps both
// UKs until this VM says which one its image holds. If the image still
// opens with the current UK, cancelRotation drops any keyslot of the
// pending one (disk.DropKey) and confirms with the current UK, which ends
// the cancel: the service destroys the pending UK. If the image opens with
// the pending UK alone (an earlier boot removed the old keyslot before it
// could confirm) the cancel came too late: the rotation is completed and
// confirmed as usual (rotate), which the service accepts. Either way the
// image keeps a key the service holds, and every step resumes after a
// crash on the next boot.

// cancelRotation ends a cancelled rotation and returns the UK the image
// opens with, or an injected crash.
func (b *Boot) cancelRotation(ctx context.Context, volume string, uk, next *tpm.Secret) (*tpm.Secret, error) {
	cur, err := disk.NewKey(uk.Bytes())
	if err != nil {
		return nil, fmt.Errorf("boot: %w", err)
	}
	defer cur.Destroy()
	nk, err := disk.NewKey(next.Bytes())
	if err != nil {
		return nil, fmt.Errorf("boot: %w", err)
	}
	defer nk.Destroy()
	res, err := disk.DropKey(b.cfg.Image, cur, nk, disk.RotateOptions{After: injected})
	var crash *crashError
	switch {
	case errors.As(err, &crash):
		return nil, fmt.Errorf("boot: cancel rotation of %s: %w", b.cfg.Image, err)
	case errors.Is(err, disk.ErrRotateKeys):
		b.emit(Event{Kind: EventRotation, Err: err, Message: fmt.Sprintf("the rotation of volume %s was cancelled, but the image opens with the new unwrap key alone; completing it instead", volume)})
		return b.rotate(ctx, volume, uk, next)
	case err != nil:
		b.emit(Event{Kind: EventRotation, Err: err, Message: fmt.Sprintf("cancelled rotation of volume %s not undone in this boot (%v); the next boot resumes it", volume, err)})
		return uk, nil
	}
	b.log.Info("rotation cancelled: image keeps the current key", slog.String("volume", volume), slog.Int("keyslot", res.NewSlot), slog.Any("removed", res.Removed), slog.Any("steps", res.Steps))
	resp, err := b.cl.ConfirmRotation(ctx, b.session, api.RotateProof(uk.Bytes(), b.session))
	if err == nil {
		err = injected(stepConfirm)
	}
	if errors.As(err, &crash) {
		return nil, fmt.Errorf("boot: cancel rotation of %s: %w", b.cfg.Image, err)
	}
	if err != nil {
		b.emit(Event{Kind: EventRotation, Err: err, Message: fmt.Sprintf("cancelled rotation of volume %s: the image opens with the current unwrap key alone, but the key service did not take the proof (%v); the next boot confirms again", volume, err)})
		return uk, nil
	}
	b.emit(Event{Kind: EventRotationCancelled, Message: fmt.Sprintf("the rotation of volume %s was cancelled: the image opens with the current unwrap key (keyslot %d); the key service answered %q and destroyed the pending key", volume, res.NewSlot, resp.Rotation)})
	return uk, nil
}
