package luks2

import (
	"errors"
	"fmt"
	"sort"
	"strings"

	"github.com/awnumar/memguard"
	"github.com/keygate/keygate/disk/xts"
	"github.com/keygate/keygate/keymem"
)

// Keyslot areas are encrypted in 512-byte sectors whose tweak counts from 0
// at the start of the area, whatever the data segment's sector size.
const keyslotSector = 512

// errEmptyPassphrase: cryptsetup refuses an empty key file, so a keyslot
// with an empty passphrase could not be opened with the same file there.
var errEmptyPassphrase = errors.New("empty passphrase or key file: give a non-empty one")

// areaAlign is the alignment cryptsetup gives keyslot areas.
const areaAlign = 4096

// digestFor returns the digest (and its id) that covers keyslot id.
func (m *metadata) digestFor(id string) (string, *jsonDigest) {
	for _, did := range sortedIDs(m.Digests) {
		d := m.Digests[itoa(did)]
		for _, k := range d.Keyslots {
			if k == id {
				return itoa(did), d
			}
		}
	}
	return "", nil
}

// segmentDigest returns the digest bound to the data segment: the one a
// volume key must match to be the volume's key.
func (m *metadata) segmentDigest() (string, *jsonDigest) {
	for _, did := range sortedIDs(m.Digests) {
		d := m.Digests[itoa(did)]
		if len(d.Segments) > 0 {
			return itoa(did), d
		}
	}
	return "", nil
}

// findArea returns the lowest 4096-aligned offset in the keyslots area
// where size bytes fit between the existing keyslot areas (first fit, as
// cryptsetup allocates).
func (m *metadata) findArea(hdrSize, size uint64) (uint64, bool) {
	type span struct{ off, end uint64 }
	var used []span
	for _, k := range m.Keyslots {
		if k.Area.Size > 0 {
			used = append(used, span{uint64(k.Area.Offset), uint64(k.Area.Offset + k.Area.Size)})
		}
	}
	sort.Slice(used, func(i, j int) bool { return used[i].off < used[j].off })
	off := 2 * hdrSize
	end := off + uint64(m.Config.KeyslotsSize)
	for _, u := range used {
		if off+size <= u.off {
			break
		}
		if u.end > off {
			off = (u.end + areaAlign - 1) / areaAlign * areaAlign
		}
	}
	return off, off+size <= end
}

// writeKeyslot encrypts vk into a new keyslot id of m under passphrase and
// writes its area. The caller commits m afterwards; until then the area is
// unused space, so a failure leaves the volume as it was.
func (v *Volume) writeKeyslot(m *metadata, id int, vk, passphrase []byte, p PBKDF) error {
	if err := p.check(); err != nil {
		return err
	}
	n := afSize(len(vk), AFStripes)
	areaSize := (n + areaAlign - 1) / areaAlign * areaAlign
	off, ok := m.findArea(v.bin.hdrSize, areaSize)
	if !ok {
		return fmt.Errorf("no room for a %d-byte keyslot area in the keyslots area (remove a keyslot first): %w", areaSize, ErrNoSpace)
	}
	kdf, err := p.toJSON()
	if err != nil {
		return err
	}
	key, err := deriveKey(kdf, passphrase, len(vk))
	if err != nil {
		return fmt.Errorf("derive keyslot %d key: %w", id, err)
	}
	defer key.Destroy()
	material, err := keymem.New(int(n))
	if err != nil {
		return fmt.Errorf("keyslot %d split material: %w", id, err)
	}
	defer material.Destroy()
	if err := afSplit(material.Bytes(), vk, AFStripes, "sha256"); err != nil {
		return err
	}
	c, err := xts.New(key.Bytes())
	if err != nil {
		return fmt.Errorf("keyslot %d cipher: %w", id, err)
	}
	defer c.Close()
	enc := make([]byte, n)
	c.EncryptSectors(enc, material.Bytes(), keyslotSector, 0, 1)
	if err := v.writeSync(enc, int64(off), fmt.Sprintf("keyslot %d area", id)); err != nil {
		return err
	}
	m.Keyslots[itoa(id)] = &jsonKeyslot{
		Type:    "luks2",
		KeySize: len(vk),
		AF:      &jsonAF{Type: "luks1", Stripes: AFStripes, Hash: "sha256"},
		Area:    jsonArea{Type: "raw", Offset: u64s(off), Size: u64s(areaSize), Encryption: "aes-xts-plain64", KeySize: len(vk)},
		KDF:     kdf,
	}
	return nil
}

// openSlot tries passphrase on keyslot id and returns the volume key.
func (v *Volume) openSlot(id string, passphrase []byte) (*memguard.LockedBuffer, error) {
	k, ok := v.meta.Keyslots[id]
	if !ok {
		return nil, fmt.Errorf("keyslot %s does not exist", id)
	}
	if k.opaque != nil {
		return nil, unsupported("keyslot type "+k.Type, "keyslot %s cannot hold a passphrase keygate opens", id)
	}
	if k.Area.Encryption != "aes-xts-plain64" || (k.Area.KeySize != 64 && k.Area.KeySize != 32) {
		return nil, unsupported("keyslot cipher "+k.Area.Encryption, "keyslot %s: keygate decrypts aes-xts-plain64 keyslots with 32- or 64-byte keys", id)
	}
	_, d := v.meta.digestFor(id)
	if d == nil {
		return nil, fmt.Errorf("keyslot %s has no digest to check its key against (header damaged?)", id)
	}
	n := afSize(k.KeySize, k.AF.Stripes)
	enc := make([]byte, n)
	if _, err := v.f.ReadAt(enc, int64(k.Area.Offset)); err != nil {
		return nil, fmt.Errorf("read keyslot %s area: %w", id, err)
	}
	key, err := deriveKey(k.KDF, passphrase, k.Area.KeySize)
	if err != nil {
		return nil, fmt.Errorf("keyslot %s: %w", id, err)
	}
	defer key.Destroy()
	c, err := xts.New(key.Bytes())
	if err != nil {
		return nil, fmt.Errorf("keyslot %s cipher: %w", id, err)
	}
	defer c.Close()
	material, err := keymem.New(int(n))
	if err != nil {
		return nil, fmt.Errorf("keyslot %s split material: %w", id, err)
	}
	defer material.Destroy()
	c.DecryptSectors(material.Bytes(), enc, keyslotSector, 0, 1)
	vk, err := keymem.NewLocked(k.KeySize)
	if err != nil {
		return nil, fmt.Errorf("keyslot %s volume key: %w", id, err)
	}
	if err := afMerge(vk.Bytes(), material.Bytes(), k.AF.Stripes, k.AF.Hash); err != nil {
		vk.Destroy()
		return nil, fmt.Errorf("keyslot %s: %w", id, err)
	}
	match, err := d.verify(vk.Bytes())
	if err != nil || !match {
		vk.Destroy()
		if err != nil {
			return nil, fmt.Errorf("keyslot %s: %w", id, err)
		}
		return nil, ErrWrongKey
	}
	vk.Freeze()
	return vk, nil
}

// priority of a keyslot: 0 ignore, 1 normal (the default), 2 high.
func (k *jsonKeyslot) priority() int {
	if k.Priority == nil {
		return 1
	}
	return *k.Priority
}

// Unlock tries passphrase on every keyslot that can open the data segment,
// high priority first, then normal, by id; slots with priority "ignore"
// are skipped, as cryptsetup skips them. It returns the volume key in a
// frozen locked buffer (the caller destroys it) and the slot that opened,
// or ErrWrongKey. The image is never written.
func (v *Volume) Unlock(passphrase []byte) (*memguard.LockedBuffer, int, error) {
	var ids []int
	for _, id := range sortedIDs(v.meta.Keyslots) {
		k := v.meta.Keyslots[itoa(id)]
		if _, d := v.meta.digestFor(itoa(id)); k.opaque == nil && k.priority() > 0 && d != nil && len(d.Segments) > 0 {
			ids = append(ids, id)
		}
	}
	sort.SliceStable(ids, func(i, j int) bool {
		return v.meta.Keyslots[itoa(ids[i])].priority() > v.meta.Keyslots[itoa(ids[j])].priority()
	})
	return v.tryKeyslots(ids, passphrase)
}

// UnlockSlot tries passphrase on keyslot slot only, whatever its priority.
func (v *Volume) UnlockSlot(slot int, passphrase []byte) (*memguard.LockedBuffer, error) {
	vk, _, err := v.tryKeyslots([]int{slot}, passphrase)
	return vk, err
}

// UnlockToken tries passphrase on the keyslots token id names, in the
// token's order and whatever their priority, as cryptsetup's --token-id
// does.
func (v *Volume) UnlockToken(id int, passphrase []byte) (*memguard.LockedBuffer, int, error) {
	t, ok := v.meta.Tokens[itoa(id)]
	if !ok {
		return nil, -1, fmt.Errorf("token %d does not exist (see Info().Tokens)", id)
	}
	var ids []int
	for _, s := range t.Keyslots {
		n, err := parseID(s, maxKeyslots)
		if err == nil {
			ids = append(ids, n)
		}
	}
	return v.tryKeyslots(ids, passphrase)
}

func (v *Volume) tryKeyslots(ids []int, passphrase []byte) (*memguard.LockedBuffer, int, error) {
	if err := v.meta.checkRequirements("unlock"); err != nil {
		return nil, -1, err
	}
	if len(ids) == 0 {
		return nil, -1, fmt.Errorf("no usable keyslot to try (add a key with cryptsetup luksAddKey or keygate disk add-key): %w", ErrWrongKey)
	}
	var wrong []string
	var other []error
	for _, id := range ids {
		vk, err := v.openSlot(itoa(id), passphrase)
		if err == nil {
			return vk, id, nil
		}
		if errors.Is(err, ErrWrongKey) {
			wrong = append(wrong, itoa(id))
		} else {
			other = append(other, err)
		}
	}
	if len(other) == 0 {
		return nil, -1, fmt.Errorf("no keyslot opened with this passphrase (tried slot %s); check the key file: %w",
			strings.Join(wrong, ", "), ErrWrongKey)
	}
	if len(wrong) > 0 {
		other = append(other, fmt.Errorf("slot %s: %w", strings.Join(wrong, ", "), ErrWrongKey))
	}
	return nil, -1, fmt.Errorf("no keyslot opened: %w", errors.Join(other...))
}

// AddKeyslot adds a keyslot holding volumeKey under passphrase, in the
// lowest free slot id and the first free area, and returns its id. The key
// must match the volume's digest, so a wrong key can never be enrolled.
// A zero p means PassphrasePBKDF(); pass KeyPBKDF() for a high-entropy
// secret such as the key service's unwrap key.
func (v *Volume) AddKeyslot(volumeKey *memguard.LockedBuffer, passphrase []byte, p PBKDF) (int, error) {
	if err := v.meta.checkRequirements("add a keyslot"); err != nil {
		return -1, err
	}
	if len(passphrase) == 0 {
		return -1, errEmptyPassphrase
	}
	if p == (PBKDF{}) {
		p = PassphrasePBKDF()
	}
	did, d := v.meta.segmentDigest()
	if d == nil {
		return -1, fmt.Errorf("the volume has no digest bound to its data segment; cannot check the volume key")
	}
	if match, err := d.verify(volumeKey.Bytes()); err != nil {
		return -1, err
	} else if !match {
		return -1, fmt.Errorf("the volume key does not match this volume's digest: %w", ErrWrongKey)
	}
	id := -1
	for i := 0; i < maxKeyslots; i++ {
		if _, used := v.meta.Keyslots[itoa(i)]; !used {
			id = i
			break
		}
	}
	if id < 0 {
		return -1, fmt.Errorf("all %d keyslots are in use (remove one first): %w", maxKeyslots, ErrNoSpace)
	}
	m := v.meta.clone()
	if err := v.writeKeyslot(m, id, volumeKey.Bytes(), passphrase, p); err != nil {
		return -1, err
	}
	m.Digests[did].Keyslots = append(m.Digests[did].Keyslots, itoa(id))
	if err := v.commit(m); err != nil {
		return -1, err
	}
	return id, nil
}

// RemoveKeyslot wipes keyslot slot's area (random bytes, fsync) and then
// drops it from the metadata, its digest and its tokens, as cryptsetup's
// luksKillSlot does. Removing the last keyslot that opens the data segment
// fails with ErrLastKeyslot unless force is set: without a keyslot the
// volume can only be opened by someone who already holds its key.
func (v *Volume) RemoveKeyslot(slot int, force bool) error {
	if err := v.meta.checkRequirements("remove a keyslot"); err != nil {
		return err
	}
	id := itoa(slot)
	k, ok := v.meta.Keyslots[id]
	if !ok {
		return fmt.Errorf("keyslot %d does not exist (see Info().Keyslots)", slot)
	}
	if !force {
		others := 0
		for kid, kk := range v.meta.Keyslots {
			if _, d := v.meta.digestFor(kid); kid != id && kk.opaque == nil && d != nil && len(d.Segments) > 0 {
				others++
			}
		}
		if others == 0 {
			return fmt.Errorf("keyslot %d is the last key to the volume; add another key first, or force to crypto-erase: %w", slot, ErrLastKeyslot)
		}
	}
	// Wipe first: once the area is gone the key is gone, even if the
	// metadata update below is interrupted.
	if k.Area.Size > 0 {
		if err := v.fillRandom(int64(k.Area.Offset), int64(k.Area.Size)); err != nil {
			return fmt.Errorf("wipe keyslot %d area: %w", slot, err)
		}
		if err := v.f.Sync(); err != nil {
			return fmt.Errorf("sync keyslot %d area: %w", slot, err)
		}
	}
	m := v.meta.clone()
	delete(m.Keyslots, id)
	for _, d := range m.Digests {
		d.Keyslots = without(d.Keyslots, id)
	}
	for _, t := range m.Tokens {
		t.Keyslots = without(t.Keyslots, id)
	}
	return v.commit(m)
}

func without(list []string, s string) []string {
	out := list[:0:0]
	for _, x := range list {
		if x != s {
			out = append(out, x)
		}
	}
	if out == nil {
		out = []string{}
	}
	return out
}
