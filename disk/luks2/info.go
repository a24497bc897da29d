package luks2

// Info is a summary of the header for `keygate disk info --json`. It never
// holds a secret: no salts, digests or key material.
type Info struct {
	Version      int           `json:"version"`
	UUID         string        `json:"uuid"`
	Label        string        `json:"label"`
	Subsystem    string        `json:"subsystem"`
	SeqID        uint64        `json:"seqid"`
	MetadataSize uint64        `json:"metadata_size"`
	KeyslotsSize uint64        `json:"keyslots_size"`
	Segment      *SegmentInfo  `json:"segment,omitempty"` // nil when DataSegment fails
	SegmentError string        `json:"segment_error,omitempty"`
	Keyslots     []KeyslotInfo `json:"keyslots"`
	Tokens       []TokenInfo   `json:"tokens"`
	Flags        []string      `json:"flags,omitempty"`
	Requirements []string      `json:"requirements,omitempty"`
	Headers      [2]CopyStatus `json:"headers"`
}

// KeyslotInfo describes one keyslot.
type KeyslotInfo struct {
	ID         int    `json:"id"`
	Type       string `json:"type"`
	KeySize    int    `json:"key_size,omitempty"` // volume key bytes
	PBKDF      *PBKDF `json:"pbkdf,omitempty"`
	Priority   string `json:"priority"` // "ignore", "normal" or "high"
	Cipher     string `json:"cipher,omitempty"`
	AreaOffset uint64 `json:"area_offset"`
	AreaSize   uint64 `json:"area_size"`
}

// TokenInfo describes one token.
type TokenInfo struct {
	ID       int    `json:"id"`
	Type     string `json:"type"`
	Keyslots []int  `json:"keyslots"`
	// For a keygate token: where its key service is, the volume's id
	// there, and the CA the VM pins (what an operator compares with the
	// service's DATA/ca.pem when unlocks are refused).
	KeysvcURLs []string `json:"keysvc_urls,omitempty"`
	VolumeID   string   `json:"volume_id,omitempty"`
	CASHA256   string   `json:"ca_sha256,omitempty"`
}

// Keyslots describes the keyslots in id order.
func (v *Volume) Keyslots() []KeyslotInfo {
	out := []KeyslotInfo{}
	for _, id := range sortedIDs(v.meta.Keyslots) {
		k := v.meta.Keyslots[itoa(id)]
		ki := KeyslotInfo{ID: id, Type: k.Type, AreaOffset: uint64(k.Area.Offset), AreaSize: uint64(k.Area.Size),
			Priority: [...]string{"ignore", "normal", "high"}[k.priority()]}
		if k.opaque == nil {
			p := k.KDF.pbkdf()
			ki.KeySize, ki.PBKDF, ki.Cipher = k.KeySize, &p, k.Area.Encryption
		}
		out = append(out, ki)
	}
	return out
}

// Info summarises the volume.
func (v *Volume) Info() Info {
	c := v.meta.Config
	in := Info{
		Version: 2, UUID: v.bin.uuid, Label: v.bin.label, Subsystem: v.bin.subsystem, SeqID: v.bin.seqID,
		MetadataSize: v.bin.hdrSize, KeyslotsSize: uint64(c.KeyslotsSize),
		Keyslots: v.Keyslots(), Tokens: []TokenInfo{}, Flags: c.Flags, Headers: v.copies,
	}
	if c.Requirements != nil {
		in.Requirements = c.Requirements.Mandatory
	}
	if s, err := v.DataSegment(); err == nil {
		in.Segment = &s
	} else {
		in.SegmentError = err.Error()
	}
	for _, id := range sortedIDs(v.meta.Tokens) {
		t := tokenFromJSON(v.meta.Tokens[itoa(id)])
		if t.Keyslots == nil {
			t.Keyslots = []int{}
		}
		ti := TokenInfo{ID: id, Type: t.Type, Keyslots: t.Keyslots}
		if k, err := ParseKeygateToken(t); t.Type == KeygateTokenType && err == nil {
			ti.KeysvcURLs, ti.VolumeID, ti.CASHA256 = k.URLs(), k.VolumeID, k.CASHA256
		}
		in.Tokens = append(in.Tokens, ti)
	}
	return in
}
