package luks2

import (
	"bytes"
	"crypto/rand"
	"crypto/sha1"
	"crypto/sha256"
	"crypto/sha512"
	"crypto/subtle"
	"encoding/binary"
	"fmt"
	"hash"
	"strings"
)

// Sizes of the profile keygate writes (docs/format.md, profile v1). They are
// cryptsetup 2.6's luksFormat defaults.
const (
	// MetadataSize is the size of one header copy: the 4 KiB binary header
	// followed by the JSON area.
	MetadataSize = 0x4000
	// DataOffset is where the data segment starts.
	DataOffset = 16 << 20
	// KeyslotsSize is the keyslots area between the second header copy and
	// the data segment.
	KeyslotsSize = DataOffset - 2*MetadataSize
)

// Layout of the 4096-byte binary header (all integers big-endian).
const (
	binHeaderSize = 4096
	offMagic      = 0
	offVersion    = 6
	offHdrSize    = 8
	offSeqID      = 16
	offLabel      = 24
	offCsumAlg    = 72
	offSalt       = 104
	offUUID       = 168
	offSubsystem  = 208
	offHdrOffset  = 256
	offCsum       = 448
	lenLabel      = 48
	lenCsumAlg    = 32
	lenSalt       = 64
	lenUUID       = 40
	lenSubsystem  = 48
	lenCsum       = 64
)

var (
	magicPrimary   = []byte("LUKS\xba\xbe")
	magicSecondary = []byte("SKUL\xba\xbe")
)

// hdrSizes are the metadata sizes cryptsetup accepts. The secondary copy
// sits at one of them, which is where Open looks for it when the primary
// cannot say.
var hdrSizes = []uint64{0x4000, 0x8000, 0x10000, 0x20000, 0x40000, 0x80000, 0x100000, 0x200000, 0x400000}

func validHdrSize(n uint64) bool {
	for _, s := range hdrSizes {
		if s == n {
			return true
		}
	}
	return false
}

// binHeader is the parsed binary part of one header copy.
type binHeader struct {
	hdrSize   uint64
	seqID     uint64
	label     string
	csumAlg   string
	uuid      string
	subsystem string
	hdrOffset uint64
}

// headerCopy is one parsed and verified header copy.
type headerCopy struct {
	bin  binHeader
	meta *metadata
}

func csumHash(alg string) (hash.Hash, bool) {
	switch alg {
	case "sha256":
		return sha256.New(), true
	case "sha512":
		return sha512.New(), true
	case "sha1":
		return sha1.New(), true
	}
	return nil, false
}

// cString reads a NUL-terminated string from a fixed-size field. Like
// cryptsetup, it ignores the field's last byte, which must be the
// terminator, so a field with no NUL in it reads the same as it is written
// back.
func cString(b []byte) string {
	b = b[:len(b)-1]
	if i := bytes.IndexByte(b, 0); i >= 0 {
		b = b[:i]
	}
	return string(b)
}

// parseCopy verifies and parses one header copy. buf must hold at least
// the copy's hdr_size bytes when the binary header is sane; the caller
// reads enough (see readCopy). The checks run in the order of the Check*
// constants and the first failure is reported.
func parseCopy(buf []byte, offset uint64, secondary bool) (*headerCopy, *HeaderError) {
	name, magic := "primary", magicPrimary
	if secondary {
		name, magic = "secondary", magicSecondary
	}
	fail := func(check, format string, args ...any) (*headerCopy, *HeaderError) {
		return nil, &HeaderError{Copy: name, Offset: int64(offset), Check: check, Detail: fmt.Sprintf(format, args...)}
	}
	if len(buf) < binHeaderSize {
		return fail(CheckShort, "only %d bytes, the binary header needs %d", len(buf), binHeaderSize)
	}
	if !bytes.Equal(buf[offMagic:offMagic+6], magic) {
		return fail(CheckMagic, "bad magic %q", buf[offMagic:offMagic+6])
	}
	if v := binary.BigEndian.Uint16(buf[offVersion:]); v != 2 {
		if v == 1 {
			return fail(CheckVersion, "this is a LUKS1 header (convert it with cryptsetup convert --type luks2)")
		}
		return fail(CheckVersion, "version %d, want 2", v)
	}
	var h binHeader
	h.hdrSize = binary.BigEndian.Uint64(buf[offHdrSize:])
	if !validHdrSize(h.hdrSize) {
		return fail(CheckSize, "metadata size %d is not one cryptsetup uses (16 KiB to 4 MiB, a power of two)", h.hdrSize)
	}
	h.hdrOffset = binary.BigEndian.Uint64(buf[offHdrOffset:])
	want := uint64(0)
	if secondary {
		want = h.hdrSize
	}
	if h.hdrOffset != offset || offset != want {
		return fail(CheckOffset, "header says it lives at offset %d but was found at %d (metadata size %d)", h.hdrOffset, offset, h.hdrSize)
	}
	if uint64(len(buf)) < h.hdrSize {
		return fail(CheckShort, "only %d bytes, metadata size is %d", len(buf), h.hdrSize)
	}
	buf = buf[:h.hdrSize]
	h.csumAlg = cString(buf[offCsumAlg : offCsumAlg+lenCsumAlg])
	hh, ok := csumHash(h.csumAlg)
	if !ok {
		return fail(CheckChecksum, "unsupported checksum algorithm %q", h.csumAlg)
	}
	if got, stored := checksum(hh, buf), buf[offCsum:offCsum+hh.Size()]; subtle.ConstantTimeCompare(got, stored) != 1 {
		return fail(CheckChecksum, "checksum mismatch")
	}
	h.seqID = binary.BigEndian.Uint64(buf[offSeqID:])
	h.label = cString(buf[offLabel : offLabel+lenLabel])
	h.uuid = cString(buf[offUUID : offUUID+lenUUID])
	h.subsystem = cString(buf[offSubsystem : offSubsystem+lenSubsystem])

	area := buf[binHeaderSize:]
	end := bytes.IndexByte(area, 0)
	if end < 0 {
		return fail(CheckJSON, "JSON area is not NUL-terminated")
	}
	m, err := parseMetadata(area[:end])
	if err != nil {
		return fail(CheckJSON, "%v", err)
	}
	if err := m.validate(h.hdrSize); err != nil {
		return fail(CheckMetadata, "%v", err)
	}
	return &headerCopy{bin: h, meta: m}, nil
}

// checksum hashes the copy with its checksum field taken as zero.
func checksum(h hash.Hash, buf []byte) []byte {
	h.Write(buf[:offCsum])
	h.Write(make([]byte, lenCsum))
	h.Write(buf[offCsum+lenCsum:])
	return h.Sum(nil)
}

// marshalCopy renders one header copy of h.hdrSize bytes with metadata
// json (already encoded). A fresh header salt is drawn for every write, as
// each copy carries its own.
func marshalCopy(h binHeader, json []byte, secondary bool) ([]byte, error) {
	if uint64(len(json)) >= h.hdrSize-binHeaderSize {
		return nil, fmt.Errorf("metadata JSON is %d bytes but the JSON area holds %d: %w (remove tokens)",
			len(json), h.hdrSize-binHeaderSize-1, ErrNoSpace)
	}
	buf := make([]byte, h.hdrSize)
	magic := magicPrimary
	h.hdrOffset = 0
	if secondary {
		magic = magicSecondary
		h.hdrOffset = h.hdrSize
	}
	copy(buf[offMagic:], magic)
	binary.BigEndian.PutUint16(buf[offVersion:], 2)
	binary.BigEndian.PutUint64(buf[offHdrSize:], h.hdrSize)
	binary.BigEndian.PutUint64(buf[offSeqID:], h.seqID)
	copy(buf[offLabel:offLabel+lenLabel-1], h.label)
	copy(buf[offCsumAlg:offCsumAlg+lenCsumAlg-1], h.csumAlg)
	if _, err := rand.Read(buf[offSalt : offSalt+lenSalt]); err != nil {
		return nil, fmt.Errorf("draw header salt: %w", err)
	}
	copy(buf[offUUID:offUUID+lenUUID-1], h.uuid)
	copy(buf[offSubsystem:offSubsystem+lenSubsystem-1], h.subsystem)
	binary.BigEndian.PutUint64(buf[offHdrOffset:], h.hdrOffset)
	copy(buf[binHeaderSize:], json)
	hh, ok := csumHash(h.csumAlg)
	if !ok {
		return nil, unsupported("checksum "+h.csumAlg, "keygate writes sha256, sha512 or sha1 header checksums")
	}
	copy(buf[offCsum:], checksum(hh, buf))
	return buf, nil
}

// checkText validates a label or subsystem for its 48-byte NUL-terminated
// field.
func checkText(what, s string) error {
	if len(s) > lenLabel-1 {
		return fmt.Errorf("%s is %d bytes; LUKS2 allows at most %d", what, len(s), lenLabel-1)
	}
	if strings.IndexByte(s, 0) >= 0 {
		return fmt.Errorf("%s contains a NUL byte", what)
	}
	return nil
}
