package boot

import (
	"context"
	"errors"
	"fmt"
	"log/slog"

	tpmpb "github.com/google/go-tpm-tools/proto/tpm"
	"google.golang.org/protobuf/proto"

	"github.com/keygate/keygate/disk"
	"github.com/keygate/keygate/keysvc/api"
	"github.com/keygate/keygate/tpm"
)

// Unwrap-key rotation on the VM side (docs/protocol.md, "Rotation"). While
// a rotation is pending the unlock answer carries the next UK too; Run
// re-keys the image with disk.RotateKey (add a keyslot under the next UK,
// point the token at it, remove the old keyslot) and then proves to the
// key service that it holds the next UK, which makes the service destroy
// the old one. Each step is crash-safe and the next boot resumes an
// interrupted rotation: the service keeps both UKs, and releases both,
// until the proof arrives, and RotateKey finds where the image is.
//
// A rotation that cannot finish (no free keyslot, the key service away
// for the proof) never stops the boot: the volume opens with whichever
// UK opens it, and the next boot tries again.

// rotateFault, set by tests only, runs after each step of a rotation: the
// disk steps (disk.Rotate*) and stepConfirm; an error is a crash there, and
// Run fails with it.
var rotateFault func(step string) error

// stepConfirm is the rotation's last step: the key service confirmed.
const stepConfirm = "confirmed"

// crashError is an injected crash (rotateFault): Run stops with it.
type crashError struct{ err error }

func (e *crashError) Error() string { return "injected crash: " + e.err.Error() }
func (e *crashError) Unwrap() error { return e.err }

func injected(step string) error {
	if rotateFault == nil {
		return nil
	}
	if err := rotateFault(step); err != nil {
		return &crashError{err}
	}
	return nil
}

// importNext imports the pending UK's blob; nil (and logged) if it does
// not import: the rotation then waits for a later boot, and this one goes
// on with the current UK.
func (b *Boot) importNext(raw []byte) *tpm.Secret {
	blob := &tpmpb.ImportBlob{}
	if err := proto.Unmarshal(raw, blob); err != nil {
		b.emit(Event{Kind: EventRotation, Err: err, Message: fmt.Sprintf("rotation: the key service's blob of the next unwrap key does not parse (%v); the volume opens with the current one", err)})
		return nil
	}
	next, err := b.tpm.Import(blob, b.cfg.Alg)
	if err != nil {
		b.emit(Event{Kind: EventRotation, Err: err, Message: fmt.Sprintf("rotation: TPM import of the next unwrap key failed (%v); the volume opens with the current one", err)})
		return nil
	}
	return next
}

// rotate moves the image from uk to next and confirms to the key service.
// It returns the UK the image opens with, or an injected crash.
func (b *Boot) rotate(ctx context.Context, volume string, uk, next *tpm.Secret) (*tpm.Secret, error) {
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
	res, err := disk.RotateKey(b.cfg.Image, cur, nk, disk.RotateOptions{After: injected})
	var crash *crashError
	if errors.As(err, &crash) {
		return nil, fmt.Errorf("boot: rotate %s: %w", b.cfg.Image, err)
	}
	open := uk
	if res.NewSlot >= 0 {
		open = next // the next UK's keyslot is committed
	}
	if err != nil {
		b.emit(Event{Kind: EventRotation, Err: err, Message: fmt.Sprintf("rotation of volume %s not completed in this boot (%v); the next boot resumes it", volume, err)})
		return open, nil
	}
	b.log.Info("rotation: image re-keyed", slog.String("volume", volume), slog.Int("keyslot", res.NewSlot), slog.Any("removed", res.Removed), slog.Any("steps", res.Steps))
	resp, err := b.cl.ConfirmRotation(ctx, b.session, api.RotateProof(next.Bytes(), b.session))
	if err == nil {
		err = injected(stepConfirm)
	}
	if errors.As(err, &crash) {
		return nil, fmt.Errorf("boot: rotate %s: %w", b.cfg.Image, err)
	}
	if err != nil {
		b.emit(Event{Kind: EventRotation, Err: err, Message: fmt.Sprintf("rotation of volume %s: the image opens with the new unwrap key alone, but the key service did not take the proof (%v); the next boot confirms again", volume, err)})
		return next, nil
	}
	b.emit(Event{Kind: EventRotated, Message: fmt.Sprintf("volume %s rotated to a new unwrap key (keyslot %d); the key service answered %q and destroyed the old key", volume, res.NewSlot, resp.Rotation)})
	return next, nil
}
