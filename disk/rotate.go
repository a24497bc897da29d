package disk

import (
	"encoding/json"
	"errors"
	"fmt"
	"strconv"

	"github.com/keygate/keygate/disk/luks2"
)

// Unwrap-key rotation on the image (issue 15): the key service's current UK
// opens the volume, a keyslot is added under the next UK, the keygate token
// is pointed at it, and the old keyslot is removed. Each step is one
// crash-safe header commit (luks2 writes the secondary copy, syncs, then the
// primary: an interrupted commit leaves the old or the new header), and the
// order keeps a keyslot the service still holds at every point: the old one
// goes only after the new one is committed, and the service destroys the
// old UK only after keygate proves it holds the new one, which it does
// after RotateKey returns. A recovery keyslot is never touched.
//
// While the token points at the new keyslot it also names the one being
// retired (retiredField), so that a run interrupted inside the removal (the
// old keyslot's area wiped, its metadata not yet committed) still knows
// which keyslot to drop: the old UK no longer opens it.

// Steps of RotateKey, in order, for RotateOptions.After.
const (
	RotateAdded   = "added"   // keyslot under the next UK committed
	RotatePointed = "pointed" // keygate token names the new keyslot (and the retired one)
	RotateRemoved = "removed" // old keyslot wiped and dropped
	RotateCleared = "cleared" // token no longer names a retired keyslot
)

// retiredField is the keygate token member naming the keyslot a rotation
// is retiring, a decimal string (cryptsetup keeps unknown token members).
const retiredField = "keygate_retired_keyslot"

// RotateOptions tune RotateKey.
type RotateOptions struct {
	// After, if set, runs after each step (RotateAdded, …) has been
	// committed; an error stops the rotation there, as a crash would.
	After func(step string) error
}

// RotateResult says what RotateKey found and did.
type RotateResult struct {
	NewSlot int   // the keyslot the next UK opens
	Removed []int // keyslots removed by this run
	// Steps are the steps this run committed (none if the image was
	// rotated already).
	Steps []string
}

// ErrRotateKeys means neither key given to RotateKey opens the image.
var ErrRotateKeys = errors.New("neither the current nor the next unwrap key opens the image")

// RotateKey moves the image at path from the unwrap key cur to next without
// re-encrypting data, and returns once next alone (of the two) opens it.
// It resumes where an earlier run stopped: run it again with the same keys
// after any interruption and it completes, or finds the work done. cur may
// be nil when only next is known (the key service finished the rotation);
// RotateKey then only completes what a run left behind.
func RotateKey(path string, cur, next *Key, opts RotateOptions) (RotateResult, error) {
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
		return res, fmt.Errorf("rotate key: %w", err)
	}
	defer f.Close()
	tid, tok, hasToken := keygateToken(vol)

	// Where is the image? The next UK's keyslot, if there is one, was made
	// by an earlier run with luks2.KeyPBKDF (cheap to try).
	res.NewSlot = findSlot(vol, next, hasToken, tok.Keyslots)
	if res.NewSlot < 0 {
		if cur == nil {
			return res, fmt.Errorf("rotate key: %s: %w", path, ErrRotateKeys)
		}
		vk, _, err := vol.Unlock(cur.Bytes())
		if errors.Is(err, luks2.ErrWrongKey) {
			return res, fmt.Errorf("rotate key: %s: %w", path, ErrRotateKeys)
		}
		if err != nil {
			return res, fmt.Errorf("rotate key: %s: %w", path, err)
		}
		res.NewSlot, err = vol.AddKeyslot(vk, next.Bytes(), luks2.KeyPBKDF())
		vk.Destroy()
		if err != nil {
			return res, fmt.Errorf("rotate key: add keyslot to %s: %w", path, err)
		}
		if err := after(RotateAdded); err != nil {
			return res, err
		}
	}

	// The keyslot to retire: the one the token names (or, without a
	// token, the one the current UK opens), or the one an interrupted run
	// recorded as retired.
	old := -1
	if hasToken {
		switch {
		case tok.retired >= 0:
			old = tok.retired
		case len(tok.Keyslots) == 1 && tok.Keyslots[0] != res.NewSlot:
			old = tok.Keyslots[0]
		}
	}
	if old < 0 && cur != nil && !hasToken {
		old = slotOpenedBy(vol, cur, res.NewSlot)
	}
	if !slotExists(vol, old) {
		old = -1
	}
	if err := retireSlot(vol, tid, tok, hasToken, &res, old, after); err != nil {
		return res, fmt.Errorf("rotate key: %s: %w", path, err)
	}
	if err := f.Sync(); err != nil {
		return res, fmt.Errorf("rotate key: sync %s: %w", path, err)
	}
	return res, nil
}

// retireSlot is the end of RotateKey and DropKey: the keygate token is
// pointed at res.NewSlot, naming old as retired; old is removed; the
// retired record is cleared. Each step is one header commit, run after by
// after (RotatePointed, RotateRemoved, RotateCleared); a step already done
// is skipped. old is -1 if there is nothing to remove.
func retireSlot(vol *luks2.Volume, tid int, tok keygateTok, hasToken bool, res *RotateResult, old int, after func(string) error) error {
	if hasToken && (len(tok.Keyslots) != 1 || tok.Keyslots[0] != res.NewSlot || tok.retired != old) {
		if err := setTokenSlots(vol, tid, tok.Token, res.NewSlot, old); err != nil {
			return fmt.Errorf("point the keygate token at keyslot %d: %w", res.NewSlot, err)
		}
		if err := after(RotatePointed); err != nil {
			return err
		}
	}
	if old >= 0 {
		if err := vol.RemoveKeyslot(old, false); err != nil {
			return fmt.Errorf("remove keyslot %d: %w", old, err)
		}
		res.Removed = append(res.Removed, old)
		if err := after(RotateRemoved); err != nil {
			return err
		}
	}
	if hasToken && old >= 0 {
		if err := setTokenSlots(vol, tid, currentToken(vol, tid), res.NewSlot, -1); err != nil {
			return fmt.Errorf("clear the keygate token: %w", err)
		}
		if err := after(RotateCleared); err != nil {
			return err
		}
	}
	return nil
}

// keygateTok is the volume's keygate token with the retired keyslot it
// names (-1 if none).
type keygateTok struct {
	luks2.Token
	retired int
}

func keygateToken(vol *luks2.Volume) (int, keygateTok, bool) {
	tid, _, err := vol.FindKeygateToken()
	if err != nil {
		return -1, keygateTok{retired: -1}, false
	}
	t := currentToken(vol, tid)
	kt := keygateTok{Token: t, retired: -1}
	var s string
	if raw, ok := t.Fields[retiredField]; ok && json.Unmarshal(raw, &s) == nil {
		if n, err := strconv.Atoi(s); err == nil && n >= 0 {
			kt.retired = n
		}
	}
	return tid, kt, true
}

func currentToken(vol *luks2.Volume, tid int) luks2.Token { return vol.Tokens()[tid] }

// setTokenSlots rewrites token tid to name keyslot slot, and retired as the
// keyslot being retired (none if -1).
func setTokenSlots(vol *luks2.Volume, tid int, t luks2.Token, slot, retired int) error {
	t.Keyslots = []int{slot}
	fields := make(map[string]json.RawMessage, len(t.Fields)+1)
	for k, v := range t.Fields {
		if k != retiredField {
			fields[k] = v
		}
	}
	if retired >= 0 {
		b, _ := json.Marshal(strconv.Itoa(retired))
		fields[retiredField] = b
	}
	t.Fields = fields
	return vol.SetToken(tid, t)
}

// findSlot returns the keyslot key opens among the token's keyslots and the
// pbkdf2 keyslots (the kind RotateKey adds), or -1. Argon2 keyslots (a
// recovery passphrase's) are not tried: RotateKey never makes one.
func findSlot(vol *luks2.Volume, key *Key, hasToken bool, first []int) int {
	var ids []int
	if hasToken {
		ids = append(ids, first...)
	}
	for _, ks := range vol.Keyslots() {
		if ks.PBKDF != nil && ks.PBKDF.Type == "pbkdf2" {
			ids = append(ids, ks.ID)
		}
	}
	tried := map[int]bool{}
	for _, id := range ids {
		if tried[id] {
			continue
		}
		tried[id] = true
		if opened(vol, id, key) {
			return id
		}
	}
	return -1
}

// slotOpenedBy returns the keyslot other than except that key opens, or
// -1: the pbkdf2 ones first, then any (an image without a keygate token
// whose UK was imported from a key file may hold it in an argon2 keyslot;
// with a token, the token names it and nothing is tried).
func slotOpenedBy(vol *luks2.Volume, key *Key, except int) int {
	for _, ks := range vol.Keyslots() {
		if ks.ID != except && ks.PBKDF != nil && ks.PBKDF.Type == "pbkdf2" && opened(vol, ks.ID, key) {
			return ks.ID
		}
	}
	for _, ks := range vol.Keyslots() {
		if ks.ID != except && (ks.PBKDF == nil || ks.PBKDF.Type != "pbkdf2") && opened(vol, ks.ID, key) {
			return ks.ID
		}
	}
	return -1
}

func opened(vol *luks2.Volume, slot int, key *Key) bool {
	vk, err := vol.UnlockSlot(slot, key.Bytes())
	if err != nil {
		return false
	}
	vk.Destroy()
	return true
}

func slotExists(vol *luks2.Volume, slot int) bool {
	if slot < 0 {
		return false
	}
	for _, ks := range vol.Keyslots() {
		if ks.ID == slot {
			return true
		}
	}
	return false
}
