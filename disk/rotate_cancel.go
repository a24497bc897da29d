package disk

import (
	"fmt"
)

// DropKey undoes an unwrap-key rotation the key service cancelled: it
// keeps the keyslot keep opens and removes the keyslot drop (the cancelled
// pending UK) opens, if RotateKey added one. The keygate token is pointed
// back at keep's keyslot, naming drop's as retired, before that keyslot is
// removed, and the retired record is cleared last: each step is one
// crash-safe header commit, keep opens the image throughout, and a run
// after any interruption finishes the work (the retired record names the
// keyslot even once its area is wiped). A recovery keyslot is never
// touched.
//
// If keep opens no keyslot (RotateKey already removed it: the image opens
// with drop alone) DropKey changes nothing and returns ErrRotateKeys: the
// caller then completes the rotation with RotateKey instead, since drop is
// the only key that opens the image. opts.After runs after each step
// (RotatePointed, RotateRemoved, RotateCleared).
func DropKey(path string, keep, drop *Key, opts RotateOptions) (RotateResult, error) {
	res := RotateResult{NewSlot: -1}
	after := func(step string) error {
		res.Steps = append(res.Steps, step)
		if opts.After != nil {
			return opts.After(step)
		}
		return nil
	}
	f, vol, err := openHeader(path)
	if err != nil {
		return res, fmt.Errorf("drop key: %w", err)
	}
	defer f.Close()
	tid, tok, hasToken := keygateToken(vol)
	res.NewSlot = findSlot(vol, keep, hasToken, tok.Keyslots)
	if res.NewSlot < 0 {
		res.NewSlot = slotOpenedBy(vol, keep, -1)
	}
	if res.NewSlot < 0 {
		return res, fmt.Errorf("drop key: %s: the key to keep opens no keyslot: %w", path, ErrRotateKeys)
	}
	old := -1
	if hasToken && tok.retired >= 0 && tok.retired != res.NewSlot {
		old = tok.retired
	}
	if old < 0 && drop != nil {
		if s := findSlot(vol, drop, false, nil); s >= 0 && s != res.NewSlot {
			old = s
		}
	}
	if !slotExists(vol, old) {
		old = -1
	}
	if err := retireSlot(vol, tid, tok, hasToken, &res, old, after); err != nil {
		return res, fmt.Errorf("drop key: %s: %w", path, err)
	}
	if err := f.Sync(); err != nil {
		return res, fmt.Errorf("drop key: sync %s: %w", path, err)
	}
	return res, nil
}
