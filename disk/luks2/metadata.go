package luks2

import (
	"bytes"
	"encoding/json"
	"fmt"
	"sort"
)

// Limits cryptsetup enforces on object ids.
const (
	maxKeyslots = 32
	maxTokens   = 32
	maxSegments = 32
)

// metadata is the JSON area of a header copy.
type metadata struct {
	Keyslots map[string]*jsonKeyslot `json:"keyslots"`
	Tokens   map[string]*jsonToken   `json:"tokens"`
	Segments map[string]*jsonSegment `json:"segments"`
	Digests  map[string]*jsonDigest  `json:"digests"`
	Config   *jsonConfig             `json:"config"`
	extra    map[string]json.RawMessage
}

type jsonKeyslot struct {
	Type     string   `json:"type"`
	KeySize  int      `json:"key_size"`
	AF       *jsonAF  `json:"af"`
	Area     jsonArea `json:"area"`
	KDF      *jsonKDF `json:"kdf"`
	Priority *int     `json:"priority,omitempty"`
	extra    map[string]json.RawMessage
	// opaque holds a keyslot of a type keygate does not unlock (e.g.
	// cryptsetup's "reencrypt"), kept byte for byte.
	opaque json.RawMessage
}

type jsonAF struct {
	Type    string `json:"type"`
	Stripes int    `json:"stripes"`
	Hash    string `json:"hash"`
	extra   map[string]json.RawMessage
}

type jsonArea struct {
	Type       string `json:"type"`
	Offset     u64s   `json:"offset"`
	Size       u64s   `json:"size"`
	Encryption string `json:"encryption,omitempty"`
	KeySize    int    `json:"key_size,omitempty"`
	extra      map[string]json.RawMessage
}

type jsonKDF struct {
	Type       string `json:"type"`
	Hash       string `json:"hash,omitempty"`
	Iterations int    `json:"iterations,omitempty"`
	Time       int    `json:"time,omitempty"`
	Memory     int    `json:"memory,omitempty"`
	CPUs       int    `json:"cpus,omitempty"`
	Salt       string `json:"salt"`
	extra      map[string]json.RawMessage
}

type jsonToken struct {
	Type     string   `json:"type"`
	Keyslots []string `json:"keyslots"`
	extra    map[string]json.RawMessage
}

type jsonSegment struct {
	Type       string `json:"type"`
	Offset     u64s   `json:"offset"`
	Size       string `json:"size"`
	IVTweak    u64s   `json:"iv_tweak"`
	Encryption string `json:"encryption"`
	SectorSize int    `json:"sector_size"`
	extra      map[string]json.RawMessage
	opaque     json.RawMessage // a segment type other than "crypt"
}

type jsonDigest struct {
	Type       string   `json:"type"`
	Keyslots   []string `json:"keyslots"`
	Segments   []string `json:"segments"`
	Hash       string   `json:"hash"`
	Iterations int      `json:"iterations"`
	Salt       string   `json:"salt"`
	Digest     string   `json:"digest"`
	extra      map[string]json.RawMessage
}

type jsonConfig struct {
	JSONSize     u64s              `json:"json_size"`
	KeyslotsSize u64s              `json:"keyslots_size"`
	Flags        []string          `json:"flags,omitempty"`
	Requirements *jsonRequirements `json:"requirements,omitempty"`
	extra        map[string]json.RawMessage
}

type jsonRequirements struct {
	Mandatory []string `json:"mandatory,omitempty"`
	extra     map[string]json.RawMessage
}

// The (Un)MarshalJSON pairs below route every object through
// decodeObject/encodeObject so unknown members survive a rewrite.

func (m *metadata) UnmarshalJSON(b []byte) error {
	type plain metadata
	x, err := decodeObject(b, (*plain)(m))
	m.extra = x
	return err
}
func (m metadata) MarshalJSON() ([]byte, error) {
	type plain metadata
	return encodeObject(plain(m), m.extra)
}

func (k *jsonKeyslot) UnmarshalJSON(b []byte) error {
	var t struct {
		Type string `json:"type"`
	}
	if err := json.Unmarshal(b, &t); err != nil {
		return err
	}
	if t.Type != "luks2" {
		// Keep it whole; parse only what allocation needs, if present.
		var a struct {
			Area jsonArea `json:"area"`
		}
		_ = json.Unmarshal(b, &a)
		*k = jsonKeyslot{Type: t.Type, Area: a.Area, opaque: append(json.RawMessage(nil), b...)}
		return nil
	}
	type plain jsonKeyslot
	x, err := decodeObject(b, (*plain)(k))
	k.extra = x
	return err
}
func (k jsonKeyslot) MarshalJSON() ([]byte, error) {
	if k.opaque != nil {
		return k.opaque, nil
	}
	type plain jsonKeyslot
	return encodeObject(plain(k), k.extra)
}

func (a *jsonAF) UnmarshalJSON(b []byte) error {
	type plain jsonAF
	x, err := decodeObject(b, (*plain)(a))
	a.extra = x
	return err
}
func (a jsonAF) MarshalJSON() ([]byte, error) {
	type plain jsonAF
	return encodeObject(plain(a), a.extra)
}

func (a *jsonArea) UnmarshalJSON(b []byte) error {
	type plain jsonArea
	x, err := decodeObject(b, (*plain)(a))
	a.extra = x
	return err
}
func (a jsonArea) MarshalJSON() ([]byte, error) {
	type plain jsonArea
	return encodeObject(plain(a), a.extra)
}

func (k *jsonKDF) UnmarshalJSON(b []byte) error {
	type plain jsonKDF
	x, err := decodeObject(b, (*plain)(k))
	k.extra = x
	return err
}
func (k jsonKDF) MarshalJSON() ([]byte, error) {
	type plain jsonKDF
	return encodeObject(plain(k), k.extra)
}

func (t *jsonToken) UnmarshalJSON(b []byte) error {
	type plain jsonToken
	x, err := decodeObject(b, (*plain)(t))
	t.extra = x
	return err
}
func (t jsonToken) MarshalJSON() ([]byte, error) {
	type plain jsonToken
	if t.Keyslots == nil {
		t.Keyslots = []string{}
	}
	return encodeObject(plain(t), t.extra)
}

func (s *jsonSegment) UnmarshalJSON(b []byte) error {
	var t struct {
		Type string `json:"type"`
	}
	if err := json.Unmarshal(b, &t); err != nil {
		return err
	}
	if t.Type != "crypt" {
		var o struct {
			Offset u64s `json:"offset"`
		}
		if err := json.Unmarshal(b, &o); err != nil {
			return fmt.Errorf("offset: %v", err)
		}
		*s = jsonSegment{Type: t.Type, Offset: o.Offset, opaque: append(json.RawMessage(nil), b...)}
		return nil
	}
	type plain jsonSegment
	x, err := decodeObject(b, (*plain)(s))
	s.extra = x
	return err
}
func (s jsonSegment) MarshalJSON() ([]byte, error) {
	if s.opaque != nil {
		return s.opaque, nil
	}
	type plain jsonSegment
	return encodeObject(plain(s), s.extra)
}

func (d *jsonDigest) UnmarshalJSON(b []byte) error {
	type plain jsonDigest
	x, err := decodeObject(b, (*plain)(d))
	d.extra = x
	return err
}
func (d jsonDigest) MarshalJSON() ([]byte, error) {
	type plain jsonDigest
	return encodeObject(plain(d), d.extra)
}

func (c *jsonConfig) UnmarshalJSON(b []byte) error {
	type plain jsonConfig
	x, err := decodeObject(b, (*plain)(c))
	c.extra = x
	return err
}
func (c jsonConfig) MarshalJSON() ([]byte, error) {
	type plain jsonConfig
	return encodeObject(plain(c), c.extra)
}

func (r *jsonRequirements) UnmarshalJSON(b []byte) error {
	type plain jsonRequirements
	x, err := decodeObject(b, (*plain)(r))
	r.extra = x
	return err
}
func (r jsonRequirements) MarshalJSON() ([]byte, error) {
	type plain jsonRequirements
	return encodeObject(plain(r), r.extra)
}

// parseMetadata decodes the JSON area (without its NUL padding).
func parseMetadata(b []byte) (*metadata, error) {
	m := new(metadata)
	dec := json.NewDecoder(bytes.NewReader(b))
	if err := dec.Decode(m); err != nil {
		return nil, err
	}
	if dec.More() {
		return nil, fmt.Errorf("trailing data after the JSON object")
	}
	for what, ok := range map[string]bool{
		"keyslots": m.Keyslots != nil, "tokens": m.Tokens != nil, "segments": m.Segments != nil,
		"digests": m.Digests != nil, "config": m.Config != nil,
	} {
		if !ok {
			return nil, fmt.Errorf("missing object %q", what)
		}
	}
	return m, nil
}

// encode renders the metadata as compact JSON (map keys sorted).
func (m *metadata) encode() ([]byte, error) { return json.Marshal(m) }

// clone deep-copies m through its encoding, so that a failed update never
// leaves the in-memory metadata half-changed.
func (m *metadata) clone() *metadata {
	b, err := m.encode()
	if err != nil {
		panic(fmt.Sprintf("luks2: re-encode metadata: %v", err))
	}
	c, err := parseMetadata(b)
	if err != nil {
		panic(fmt.Sprintf("luks2: re-parse metadata: %v", err))
	}
	return c
}

// sortedIDs returns the numeric keys of an id-keyed object in order.
func sortedIDs[V any](m map[string]V) []int {
	ids := make([]int, 0, len(m))
	for k := range m {
		var n int
		fmt.Sscan(k, &n)
		ids = append(ids, n)
	}
	sort.Ints(ids)
	return ids
}
