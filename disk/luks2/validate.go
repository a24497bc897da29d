package luks2

import (
	"encoding/base64"
	"fmt"
	"sort"
	"strings"
)

// knownRequirements are the mandatory requirements keygate can honour.
// cryptsetup refuses to touch a volume with a requirement it does not
// know, and so do we (see Volume.checkRequirements).
var knownRequirements = map[string]bool{}

// Caps on the work a header can ask for. cryptsetup accepts iteration
// counts up to 2^32-1, which at this machine's ~2M PBKDF2-SHA256
// iterations/s would hang a booting VM for half an hour on a header an
// attacker with write access to the disk planted. The caps sit far above
// anything cryptsetup's own benchmark produces (it aims at 2 s: a few
// million PBKDF2 iterations, or a few argon2 passes over 1 GiB), so every
// volume cryptsetup made opens, and a hostile one fails at once with the
// reason.
const (
	// maxPBKDF2Iterations bounds a keyslot's PBKDF2 (about 30 s here).
	maxPBKDF2Iterations = 1 << 26
	// maxDigestIterations bounds the volume-key digest's PBKDF2, which
	// cryptsetup sizes to an eighth of a keyslot's time.
	maxDigestIterations = 1 << 24
	// maxArgon2Work bounds argon2 time x memory, in KiB-passes: 64 GiB
	// of memory traffic, e.g. 16 passes over 4 GiB (cryptsetup's memory
	// maximum).
	maxArgon2Work = 64 << 20
	// maxArgon2MemoryKiB is cryptsetup's own maximum.
	maxArgon2MemoryKiB = 4 << 20
)

// maxKeyslotsSize is cryptsetup's upper bound on config.keyslots_size. It
// also bounds what a hostile header can make keygate allocate for a
// keyslot's split material.
const maxKeyslotsSize = 128 << 20

// validate runs the structural checks cryptsetup's LUKS2_hdr_validate runs
// that matter for reading and rewriting: id ranges, references between
// objects, keyslot areas inside the keyslots area and not overlapping, and
// the data segment after the header areas.
func (m *metadata) validate(hdrSize uint64) error {
	c := m.Config
	if uint64(c.JSONSize) != hdrSize-binHeaderSize {
		return fmt.Errorf("config.json_size is %d but the metadata size %d leaves %d", c.JSONSize, hdrSize, hdrSize-binHeaderSize)
	}
	if c.KeyslotsSize > maxKeyslotsSize {
		return fmt.Errorf("config.keyslots_size %d exceeds cryptsetup's 128 MiB limit", c.KeyslotsSize)
	}
	if c.KeyslotsSize%4096 != 0 {
		return fmt.Errorf("config.keyslots_size %d is not a multiple of 4096", c.KeyslotsSize)
	}
	areaStart := 2 * hdrSize
	areaEnd := areaStart + uint64(c.KeyslotsSize)
	if areaEnd < areaStart {
		return fmt.Errorf("config.keyslots_size %d overflows", c.KeyslotsSize)
	}
	type span struct {
		what     string
		off, end uint64
	}
	var spans []span
	for id, k := range m.Keyslots {
		if _, err := parseID(id, maxKeyslots); err != nil {
			return fmt.Errorf("keyslot: %v", err)
		}
		if k == nil {
			return fmt.Errorf("keyslot %s is null", id)
		}
		if k.opaque == nil {
			if err := k.validate(); err != nil {
				return fmt.Errorf("keyslot %s: %v", id, err)
			}
		}
		off, size := uint64(k.Area.Offset), uint64(k.Area.Size)
		if size == 0 && k.opaque != nil {
			continue
		}
		if off < areaStart || off+size > areaEnd || off+size < off {
			return fmt.Errorf("keyslot %s: area [%d, +%d) lies outside the keyslots area [%d, %d)", id, off, size, areaStart, areaEnd)
		}
		spans = append(spans, span{"keyslot " + id, off, off + size})
	}
	sort.Slice(spans, func(i, j int) bool { return spans[i].off < spans[j].off })
	for i := 1; i < len(spans); i++ {
		if spans[i].off < spans[i-1].end {
			return fmt.Errorf("%s and %s overlap", spans[i-1].what, spans[i].what)
		}
	}
	if len(m.Segments) == 0 {
		return fmt.Errorf("no data segment")
	}
	for id, s := range m.Segments {
		if _, err := parseID(id, maxSegments); err != nil {
			return fmt.Errorf("segment: %v", err)
		}
		if s == nil {
			return fmt.Errorf("segment %s is null", id)
		}
		if uint64(s.Offset) < areaEnd {
			return fmt.Errorf("segment %s starts at %d, inside the header areas that end at %d", id, s.Offset, areaEnd)
		}
		if s.opaque != nil {
			continue
		}
		if s.Size != "dynamic" {
			if _, err := parseU64(s.Size); err != nil {
				return fmt.Errorf("segment %s: size: %v", id, err)
			}
		}
		switch s.SectorSize {
		case 512, 1024, 2048, 4096:
		default:
			return fmt.Errorf("segment %s: sector_size %d is not 512, 1024, 2048 or 4096", id, s.SectorSize)
		}
		if uint64(s.Offset)%uint64(s.SectorSize) != 0 {
			return fmt.Errorf("segment %s: offset %d is not aligned to its sector size %d", id, s.Offset, s.SectorSize)
		}
		if s.Encryption == "" {
			return fmt.Errorf("segment %s: no encryption", id)
		}
	}
	for id, d := range m.Digests {
		if _, err := parseID(id, maxKeyslots); err != nil {
			return fmt.Errorf("digest: %v", err)
		}
		if d == nil {
			return fmt.Errorf("digest %s is null", id)
		}
		for _, ks := range d.Keyslots {
			if _, ok := m.Keyslots[ks]; !ok {
				return fmt.Errorf("digest %s names keyslot %q, which does not exist", id, ks)
			}
		}
		for _, sg := range d.Segments {
			if _, ok := m.Segments[sg]; !ok {
				return fmt.Errorf("digest %s names segment %q, which does not exist", id, sg)
			}
		}
		if d.Type == "pbkdf2" {
			if err := d.validate(); err != nil {
				return fmt.Errorf("digest %s: %v", id, err)
			}
		}
	}
	for id, t := range m.Tokens {
		if _, err := parseID(id, maxTokens); err != nil {
			return fmt.Errorf("token: %v", err)
		}
		if t == nil || t.Type == "" {
			return fmt.Errorf("token %s has no type", id)
		}
		for _, ks := range t.Keyslots {
			if _, ok := m.Keyslots[ks]; !ok {
				return fmt.Errorf("token %s names keyslot %q, which does not exist", id, ks)
			}
		}
	}
	return nil
}

func (k *jsonKeyslot) validate() error {
	if k.KeySize <= 0 || k.KeySize > 512 {
		return fmt.Errorf("key_size %d out of range", k.KeySize)
	}
	if k.AF == nil || k.KDF == nil {
		return fmt.Errorf("missing af or kdf object")
	}
	if k.AF.Type != "luks1" {
		return fmt.Errorf("af type %q is not luks1", k.AF.Type)
	}
	// cryptsetup accepts any integer here but splits and merges every
	// LUKS2 keyslot with 4000 stripes (LUKS_STRIPES in
	// lib/luks2/luks2_keyslot_luks2.c) whatever the header says. keygate
	// refuses another count rather than ignore it: such a header was not
	// written by cryptsetup, and the count would otherwise size the
	// locked buffer openSlot allocates (2^20 stripes: 64 MiB).
	if k.AF.Stripes != AFStripes {
		return fmt.Errorf("af stripes %d: keygate opens only keyslots split into %d stripes, the count cryptsetup uses whatever the header says; if cryptsetup opens this volume, add the key to a new keyslot (cryptsetup luksAddKey) and remove this one (cryptsetup luksKillSlot)", k.AF.Stripes, AFStripes)
	}
	if k.Priority != nil && (*k.Priority < 0 || *k.Priority > 2) {
		return fmt.Errorf("priority %d is not 0, 1 or 2", *k.Priority)
	}
	if k.Area.Type != "raw" {
		return fmt.Errorf("area type %q is not raw", k.Area.Type)
	}
	if k.Area.KeySize <= 0 || k.Area.KeySize > 512 {
		return fmt.Errorf("area key_size %d out of range", k.Area.KeySize)
	}
	if need := afSize(k.KeySize, k.AF.Stripes); uint64(k.Area.Size) < need {
		return fmt.Errorf("area size %d is smaller than the %d bytes of split key material", k.Area.Size, need)
	}
	if _, err := base64.StdEncoding.DecodeString(k.KDF.Salt); err != nil {
		return fmt.Errorf("kdf salt: %v", err)
	}
	switch k.KDF.Type {
	case "pbkdf2":
		if k.KDF.Iterations <= 0 {
			return fmt.Errorf("pbkdf2 iterations %d out of range", k.KDF.Iterations)
		}
		if k.KDF.Iterations > maxPBKDF2Iterations {
			return fmt.Errorf("pbkdf2 iterations %d exceed keygate's cap of %d (about 30 s of work); if the header is genuine, lower them with cryptsetup luksConvertKey --pbkdf-force-iterations", k.KDF.Iterations, maxPBKDF2Iterations)
		}
	case "argon2i", "argon2id":
		if k.KDF.Time <= 0 || k.KDF.Memory <= 0 || k.KDF.CPUs <= 0 {
			return fmt.Errorf("%s needs positive time, memory and cpus", k.KDF.Type)
		}
		if k.KDF.Memory > maxArgon2MemoryKiB || k.KDF.CPUs > 255 {
			return fmt.Errorf("%s memory %d KiB, cpus %d: beyond cryptsetup's maxima (4 GiB, 255)", k.KDF.Type, k.KDF.Memory, k.KDF.CPUs)
		}
		if uint64(k.KDF.Time)*uint64(k.KDF.Memory) > maxArgon2Work {
			return fmt.Errorf("%s time %d x memory %d KiB exceeds keygate's cap of %d KiB-passes; if the header is genuine, lower them with cryptsetup luksConvertKey --pbkdf-force-iterations", k.KDF.Type, k.KDF.Time, k.KDF.Memory, maxArgon2Work)
		}
	}
	return nil
}

func (d *jsonDigest) validate() error {
	if d.Iterations <= 0 {
		return fmt.Errorf("iterations %d out of range", d.Iterations)
	}
	if d.Iterations > maxDigestIterations {
		return fmt.Errorf("iterations %d exceed keygate's cap of %d for the volume-key digest", d.Iterations, maxDigestIterations)
	}
	if _, err := base64.StdEncoding.DecodeString(d.Salt); err != nil {
		return fmt.Errorf("salt: %v", err)
	}
	dg, err := base64.StdEncoding.DecodeString(d.Digest)
	if err != nil {
		return fmt.Errorf("digest: %v", err)
	}
	if len(dg) == 0 || len(dg) > 64 {
		return fmt.Errorf("digest is %d bytes", len(dg))
	}
	return nil
}

// unmetRequirements lists mandatory requirements keygate does not know.
func (m *metadata) unmetRequirements() []string {
	if m.Config.Requirements == nil {
		return nil
	}
	var out []string
	for _, r := range m.Config.Requirements.Mandatory {
		if !knownRequirements[r] {
			out = append(out, r)
		}
	}
	return out
}

func (m *metadata) checkRequirements(op string) error {
	if r := m.unmetRequirements(); len(r) > 0 {
		return unsupported("requirement "+strings.Join(r, ", "),
			"the volume needs a feature keygate lacks before it can %s (finish it with cryptsetup, e.g. cryptsetup reencrypt --resume-only)", op)
	}
	return nil
}
