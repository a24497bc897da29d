package luks2

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
)

// Volume is an opened LUKS2 volume: the parsed header and the file it came
// from. The caller keeps ownership of the file and closes it. A Volume is
// not safe for concurrent use.
type Volume struct {
	f      *os.File
	size   int64
	bin    binHeader
	meta   *metadata
	copies [2]CopyStatus
}

// CopyStatus describes one of the two header copies as found by Open or
// left by the last write.
type CopyStatus struct {
	Copy    string `json:"copy"` // "primary" or "secondary"
	Offset  int64  `json:"offset"`
	OK      bool   `json:"ok"`
	SeqID   uint64 `json:"seqid,omitempty"`
	Problem string `json:"problem,omitempty"` // why it is not used; fixed by the next write
}

// afterFirstCopy, when set by a test, runs after the first header copy of
// an update is on disk; an error stops the update there, as a crash would.
var afterFirstCopy func() error

// Open reads and verifies both header copies of f and uses the valid one
// with the higher seqid. A damaged or stale copy is reported in
// Info().Headers and rewritten by the next update. Open fails with
// ErrNotLUKS2 when neither copy has the LUKS2 magic, with a
// *BothCopiesError (ErrCorruptHeader) naming the failed checks when neither
// copy is valid, and with ErrTruncated when the file is shorter than the
// header areas or the data offset.
func Open(f *os.File) (*Volume, error) {
	size, err := deviceSize(f)
	if err != nil {
		return nil, err
	}
	v := &Volume{f: f, size: size}
	p, perr, err := v.readCopy(0, false)
	if err != nil {
		return nil, err
	}
	var s *headerCopy
	var serr *HeaderError
	if p != nil {
		s, serr, err = v.readCopy(p.bin.hdrSize, true)
		if err != nil {
			return nil, err
		}
	} else {
		// Without a primary to say where the secondary lives, look at every
		// offset cryptsetup might have put it, as cryptsetup does.
		for _, off := range hdrSizes {
			c, cerr, err := v.readCopy(off, true)
			if err != nil {
				return nil, err
			}
			if c != nil {
				s, serr = c, nil
				break
			}
			if serr == nil || (serr.Check == CheckMagic && cerr.Check != CheckMagic) {
				serr = cerr
			}
		}
	}
	switch {
	case p == nil && s == nil:
		if perr.Check == CheckShort {
			return nil, fmt.Errorf("image is %d bytes, too short to hold its LUKS2 header (%s; was it cut short? restore it from a copy): %w",
				size, perr.Detail, ErrTruncated)
		}
		return nil, &BothCopiesError{Primary: perr, Secondary: serr}
	case p != nil && s != nil && s.bin.seqID > p.bin.seqID:
		v.use(s)
	case p != nil:
		v.use(p)
	default:
		v.use(s)
	}
	v.copies[0] = status("primary", 0, p, perr, v.bin.seqID)
	soff := int64(v.bin.hdrSize)
	if serr != nil {
		soff = serr.Offset
	}
	v.copies[1] = status("secondary", soff, s, serr, v.bin.seqID)
	if err := v.checkSize(); err != nil {
		return nil, err
	}
	return v, nil
}

// deviceSize is the size of an image file or block device (whose Stat
// size is 0).
func deviceSize(f *os.File) (int64, error) {
	st, err := f.Stat()
	if err != nil {
		return 0, fmt.Errorf("stat image: %w", err)
	}
	if st.Mode()&os.ModeDevice == 0 {
		return st.Size(), nil
	}
	n, err := f.Seek(0, io.SeekEnd)
	if err != nil {
		return 0, fmt.Errorf("size block device: %w", err)
	}
	return n, nil
}

func (v *Volume) use(c *headerCopy) { v.bin, v.meta = c.bin, c.meta }

func status(name string, off int64, c *headerCopy, e *HeaderError, seq uint64) CopyStatus {
	st := CopyStatus{Copy: name, Offset: off}
	switch {
	case c == nil:
		st.Problem = e.Check + ": " + e.Detail
	case c.bin.seqID < seq:
		st.SeqID = c.bin.seqID
		st.Problem = fmt.Sprintf("stale: seqid %d, the other copy has %d (an update was interrupted)", c.bin.seqID, seq)
	default:
		st.OK, st.SeqID = true, c.bin.seqID
	}
	return st
}

// readCopy reads and parses the header copy at off. It returns an I/O
// error only for read failures other than end of file.
func (v *Volume) readCopy(off uint64, secondary bool) (*headerCopy, *HeaderError, error) {
	buf := make([]byte, binHeaderSize)
	n, err := v.f.ReadAt(buf, int64(off))
	if err != nil && !errors.Is(err, io.EOF) {
		return nil, nil, fmt.Errorf("read header at offset %d: %w", off, err)
	}
	buf = buf[:n]
	if n == binHeaderSize {
		if hs := binary.BigEndian.Uint64(buf[offHdrSize:]); validHdrSize(hs) {
			full := make([]byte, hs)
			n, err := v.f.ReadAt(full, int64(off))
			if err != nil && !errors.Is(err, io.EOF) {
				return nil, nil, fmt.Errorf("read header at offset %d: %w", off, err)
			}
			buf = full[:n]
		}
	}
	c, herr := parseCopy(buf, off, secondary)
	return c, herr, nil
}

// checkSize refuses an image cut short before the end of the keyslots area
// or the start of the data segment.
func (v *Volume) checkSize() error {
	need := int64(2*v.bin.hdrSize) + int64(v.meta.Config.KeyslotsSize)
	what := "header and keyslot areas"
	if seg, err := v.DataSegment(); err == nil && seg.Offset > need {
		need, what = seg.Offset, "data offset"
	}
	if v.size < need {
		return fmt.Errorf("image is %d bytes but its %s end at %d (was it cut short? restore it from a copy or grow it back): %w",
			v.size, what, need, ErrTruncated)
	}
	return nil
}

// commit writes m as the new metadata to both copies with seqid+1:
// secondary, fsync, primary, fsync. Until the second fsync one copy holds
// the old and the other the new metadata, and Open takes whichever is valid
// with the higher seqid, so an interrupted update leaves either.
func (v *Volume) commit(m *metadata) error {
	if err := m.validate(v.bin.hdrSize); err != nil {
		return fmt.Errorf("refusing to write invalid metadata: %v", err)
	}
	js, err := m.encode()
	if err != nil {
		return fmt.Errorf("encode metadata: %v", err)
	}
	nb := v.bin
	nb.seqID++
	sec, err := marshalCopy(nb, js, true)
	if err != nil {
		return err
	}
	prim, err := marshalCopy(nb, js, false)
	if err != nil {
		return err
	}
	if err := v.writeSync(sec, int64(nb.hdrSize), "secondary header"); err != nil {
		return err
	}
	if afterFirstCopy != nil {
		if err := afterFirstCopy(); err != nil {
			return err
		}
	}
	if err := v.writeSync(prim, 0, "primary header"); err != nil {
		return err
	}
	v.bin, v.meta = nb, m
	v.copies[0] = CopyStatus{Copy: "primary", OK: true, SeqID: nb.seqID}
	v.copies[1] = CopyStatus{Copy: "secondary", Offset: int64(nb.hdrSize), OK: true, SeqID: nb.seqID}
	return nil
}

func (v *Volume) writeSync(b []byte, off int64, what string) error {
	if _, err := v.f.WriteAt(b, off); err != nil {
		return fmt.Errorf("write %s: %w", what, err)
	}
	if err := v.f.Sync(); err != nil {
		return fmt.Errorf("sync %s: %w", what, err)
	}
	return nil
}

// Headers reports the state of both header copies.
func (v *Volume) Headers() [2]CopyStatus { return v.copies }

// UUID returns the volume's UUID.
func (v *Volume) UUID() string { return v.bin.uuid }

// SegmentInfo describes the data segment. Sector tweaks count 512-byte
// units whatever SectorSize is: the sector at byte offset o of the segment
// uses tweak IVTweak + o/512 (cryptsetup never sets iv_large_sectors for
// LUKS2), so 4096-byte sectors step the tweak by 8.
type SegmentInfo struct {
	Offset     int64  `json:"offset"`
	Size       int64  `json:"size"` // -1: "dynamic", up to the end of the device
	SectorSize int    `json:"sector_size"`
	Cipher     string `json:"cipher"`
	IVTweak    uint64 `json:"iv_tweak"`
}

// DataSegment returns the volume's crypt segment. It fails with
// ErrNotSupported for volumes keygate cannot read data from: several
// segments (an unfinished reencryption), integrity, or a cipher other
// than aes-xts-plain64.
func (v *Volume) DataSegment() (SegmentInfo, error) {
	if len(v.meta.Segments) != 1 {
		return SegmentInfo{}, unsupported("multiple data segments", "the volume has %d segments (an unfinished reencryption?); finish it with cryptsetup", len(v.meta.Segments))
	}
	var s *jsonSegment
	for _, s = range v.meta.Segments {
	}
	if s.opaque != nil {
		return SegmentInfo{}, unsupported("segment type "+s.Type, "keygate reads crypt segments only")
	}
	if _, ok := s.extra["integrity"]; ok {
		return SegmentInfo{}, unsupported("dm-integrity", "authenticated encryption segments are not supported")
	}
	if s.Encryption != "aes-xts-plain64" {
		return SegmentInfo{}, unsupported("cipher "+s.Encryption, "keygate encrypts data with aes-xts-plain64 only")
	}
	info := SegmentInfo{Offset: int64(s.Offset), Size: -1, SectorSize: s.SectorSize, Cipher: s.Encryption, IVTweak: uint64(s.IVTweak)}
	if s.Size != "dynamic" {
		n, _ := parseU64(s.Size)
		info.Size = int64(n)
	}
	return info, nil
}

// Segment returns where the data segment starts, its sector size and its
// cipher; all zero when DataSegment fails.
func (v *Volume) Segment() (offset int64, sectorSize int, cipher string) {
	s, err := v.DataSegment()
	if err != nil {
		return 0, 0, ""
	}
	return s.Offset, s.SectorSize, s.Cipher
}
