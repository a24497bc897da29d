package keysvc

import (
	"context"
	"crypto/hmac"
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/keygate/keygate/keysvc/store"
)

// Pending-rotation rows are authenticated like VM and volume rows (issue
// 15, found in review). A rotation row carries a MAC over its volume, its
// generation, its sealed pending UK and its released and cancelling
// state; the volume's own MAC covers the generation of the latest
// rotation begun and whether it is pending. So a row is used only if it
// is genuine and it is the volume's current pending rotation: a row kept
// from an earlier rotation and put back (an older generation, or one whose
// volume has nothing pending), a row with a forged or missing MAC, and a
// pending rotation whose row was deleted are each refused as tampered:
// the pending key is not released, not confirmed, not re-sealed, and a
// critical store-tampered event names the volume; `keysvc audit verify`
// lists them too.
//
// What a MAC cannot stop, as for every other row: a writer who puts back a
// volume row and its rotation row from one earlier moment together (a
// rollback), docs/threat-model.md.

// rotationMAC covers what decides what a pending rotation releases and
// how it ends.
func (k rowKey) rotationMAC(r store.Rotation) []byte {
	return k.sum(rotationRowDomain, []byte(r.Volume), binary.BigEndian.AppendUint64(nil, r.Generation),
		r.SealedUK, flag(r.Released), flag(r.Cancelling))
}

func (k rowKey) checkRotationMAC(r store.Rotation) error {
	if len(r.MAC) == 0 {
		return &TamperError{Kind: "rotation", Name: r.Volume, Detail: "the pending rotation row has no MAC (begun before keysvc authenticated them, or inserted outside the key service)"}
	}
	if !hmac.Equal(k.rotationMAC(r), r.MAC) {
		return &TamperError{Kind: "rotation", Name: r.Volume, Detail: "the MAC does not match its pending key, generation or state"}
	}
	return nil
}

func (k *keyring) rotationMAC(r store.Rotation) []byte { return k.load().rows.rotationMAC(r) }

// checkRotation checks a pending rotation row r (nil if the volume has
// none) against its volume v, whose row the caller has checked: r's MAC
// under either key, and that r is v's pending rotation of v's generation.
func (k *keyring) checkRotation(v store.Volume, r *store.Rotation) error {
	switch {
	case r == nil && v.RotationPending && !v.Erased():
		return &TamperError{Kind: "rotation", Name: v.ID, Detail: fmt.Sprintf("rotation %d is pending but its row is missing (deleted outside the key service)", v.Rotation)}
	case r == nil:
		return nil
	}
	if err := k.check(func(rk rowKey) error { return rk.checkRotationMAC(*r) }); err != nil {
		return err
	}
	if !v.RotationPending || r.Generation != v.Rotation {
		pend := "none pending"
		if v.RotationPending {
			pend = fmt.Sprintf("rotation %d pending", v.Rotation)
		}
		return &TamperError{Kind: "rotation", Name: v.ID, Detail: fmt.Sprintf("the row is of rotation %d but the volume has %s (a row from an earlier rotation, put back)", r.Generation, pend)}
	}
	return nil
}

// pendingRotation reads vol's pending rotation (nil if none) and checks it
// against vol.
func (s *Server) pendingRotation(ctx context.Context, rs store.Rotations, vol store.Volume) (*store.Rotation, error) {
	p, err := rs.GetRotation(ctx, vol.ID)
	var r *store.Rotation
	switch {
	case err == nil:
		r = &p
	case !errors.Is(err, store.ErrNotFound):
		return nil, err
	}
	if err := s.rows.checkRotation(vol, r); err != nil {
		return nil, err
	}
	return r, nil
}

// verifyRotations checks every pending rotation row against its volume
// (and every volume that says it has one), for `keysvc audit verify`: one
// line per problem.
func (s *Server) verifyRotations(ctx context.Context, vols []store.Volume) ([]string, error) {
	rs, _, ok := s.rotations()
	if !ok {
		return nil, nil
	}
	rows, err := rs.ListRotations(ctx)
	if err != nil {
		return nil, err
	}
	byVol := make(map[string]*store.Rotation, len(rows))
	for i := range rows {
		byVol[rows[i].Volume] = &rows[i]
	}
	var out []string
	for _, v := range vols {
		if err := s.rows.checkRotation(v, byVol[v.ID]); err != nil {
			out = append(out, err.Error())
		}
	}
	return out, nil
}
