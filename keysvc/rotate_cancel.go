package keysvc

import (
	"context"
	"errors"
	"log/slog"
	"net/http"
	"strconv"

	"github.com/keygate/keygate/keysvc/api"
	"github.com/keygate/keygate/keysvc/audit"
	"github.com/keygate/keygate/keysvc/store"
)

// Cancelling a pending unwrap-key rotation (`keysvc volume rotate --id V
// --cancel`, POST /v1/admin/volumes/{id}/rotate/cancel).
//
// The danger is an image that opens only with the pending UK: a VM that
// received it has re-keyed its image step by step (disk.RotateKey), and
// once its old keyslot is gone, destroying the pending UK would leave the
// recovery passphrase as the only way in. The service cannot know how far
// the VM got; it knows whether the pending UK was ever released (the
// rotation row's released flag, set durably before the first blob
// carrying it leaves the service). So:
//
//   - never released: no VM can hold it; the pending UK is destroyed at
//     once, with the audit record, and the volume's generation stays
//     spent (its row, if put back, is refused).
//   - released: the cancel is recorded (cancelling) and both keys stay.
//     Unlocks keep releasing both, marked cancelling. keygate then keeps
//     the current UK if its image still opens with it (dropping any keyslot
//     of the pending one) and confirms with the current UK, which ends the
//     cancel and destroys the pending UK; if the image opens only with the
//     pending UK it completes the rotation instead and confirms with that,
//     which the service accepts (audited completed-despite-cancel). Either
//     way the image keeps a key the service holds.
//
// A rotation row that fails its integrity check (a row put back from an
// earlier rotation, or begun before rows were authenticated) is removed at
// once: the service never released it as it is, and it holds no key the
// service vouches for.

// adminCancelRotation is POST /v1/admin/volumes/{id}/rotate/cancel.
func (s *Server) adminCancelRotation(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	rs, via, ok := s.rotations()
	if !ok {
		writeError(w, errNoRotations)
		return
	}
	ctx := r.Context()
	vol, err := s.st.GetVolume(ctx, id)
	if err != nil {
		s.storeError(w, "cancel rotation of volume "+strconv.Quote(id), err)
		return
	}
	p, err := rs.GetRotation(ctx, id)
	if errors.Is(err, store.ErrNotFound) && !vol.RotationPending {
		writeError(w, errorf(http.StatusConflict, "nothing to cancel", "volume %q has no rotation pending", id))
		return
	}
	var row *store.Rotation
	if err == nil {
		row = &p
	} else if !errors.Is(err, store.ErrNotFound) {
		s.internal(w, "read pending rotation", err)
		return
	}
	if row == nil {
		// The volume says a rotation is pending, but its row is gone
		// (deleted outside the service): raise it. The volume cannot
		// rotate again until its row is restored from a backup.
		cerr := s.rows.checkRotation(vol, nil)
		s.tampered(r, vol.VM, id, cerr)
		writeError(w, errorf(http.StatusConflict, "run `keysvc audit verify`; the pending key is gone, so a VM that already re-keyed its image to it needs its recovery passphrase",
			"volume %q: %v", id, cerr))
		return
	}
	cerr := s.rows.checkRotation(vol, row)
	var step string
	switch {
	case cerr != nil:
		step = "cancelled"
		s.tampered(r, vol.VM, id, cerr)
	case !row.Released:
		step = "cancelled"
	case row.Cancelling:
		info := volumeInfo(vol)
		info.Rotation, info.RotationStarted = api.RotationCancelling, &row.Started
		writeJSON(w, http.StatusAccepted, info)
		return
	default:
		step = "cancel-requested"
	}
	ev := audit.Event{Actor: "admin", Action: audit.ActionRotate, Subject: id,
		Details: audit.Rotate{Volume: id, Step: step, Generation: row.Generation, Remote: remoteHost(r)}}
	if cerr != nil {
		var te *TamperError
		if errors.As(cerr, &te) {
			ev.Details = audit.Rotate{Volume: id, Step: step, Generation: row.Generation, Remote: remoteHost(r), Detail: te.Detail}
		}
	}
	bg := context.WithoutCancel(ctx)
	_, err = via.AppendVia(ctx, ev, func(next store.AuditNext) error {
		if step == "cancel-requested" {
			_, err := rs.UpdateRotation(bg, id, func(v store.Volume, cur *store.Rotation) error {
				if err := s.rows.checkVolume(v); err != nil {
					return err
				}
				if err := s.rows.checkRotation(v, cur); err != nil {
					return err
				}
				if cur.Generation != row.Generation {
					return errRotationRaced
				}
				cur.Cancelling = true
				cur.MAC = s.rows.rotationMAC(*cur)
				return nil
			}, next)
			return err
		}
		_, err := rs.FinishRotation(bg, id, func(v *store.Volume, cur store.Rotation) error {
			if err := s.rows.checkVolume(*v); err != nil {
				return err
			}
			if cur.Generation != row.Generation || cur.Released != row.Released {
				return errRotationRaced // released meanwhile: ask again
			}
			if cerr == nil {
				if err := s.rows.checkRotation(*v, &cur); err != nil {
					return err
				}
			}
			v.RotationPending = false
			v.MAC = s.rows.volumeMAC(*v)
			return nil
		}, next)
		return err
	})
	switch {
	case errors.Is(err, store.ErrNotFound), errors.Is(err, errRotationRaced):
		writeError(w, errorf(http.StatusConflict, "look at `keysvc volume list` and cancel again if it is still pending", "volume %q: the rotation changed while it was cancelled", id))
		return
	case errors.Is(err, ErrTampered):
		s.tampered(r, vol.VM, id, err)
		writeError(w, errorf(http.StatusConflict, "run `keysvc audit verify`", "cancel rotation of volume %q: %v", id, err))
		return
	case err != nil:
		s.storeError(w, "cancel rotation of volume "+strconv.Quote(id), err)
		return
	}
	s.lm.rotations.WithLabelValues(step).Inc()
	s.log.Info("rotation "+step, slog.String("volume", id), slog.String("vm", vol.VM), slog.Uint64("generation", row.Generation))
	info := volumeInfo(vol)
	if step == "cancel-requested" {
		info.Rotation, info.RotationStarted = api.RotationCancelling, &row.Started
		writeJSON(w, http.StatusAccepted, info)
		return
	}
	writeJSON(w, http.StatusOK, info)
}
