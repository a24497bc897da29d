package disk

import (
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/keygate/keygate/disk/xts"
)

// segment is where a volume's data segment lives in its file and how its
// sectors are ciphered: what the filesystem's Device (with its cache) and
// the block export's Blocks (without one) share. Sector i's XTS tweak is
// i*ss/512, as LUKS2's plain64 counts in 512-byte units; a nil g is the
// unencrypted passthrough (the performance reference).
type segment struct {
	f         *os.File
	off       int64
	ss        int
	tweakStep uint64
	g         *keyGuard
}

func newSegment(f *os.File, off int64, ss int, c *xts.Cipher) segment {
	s := segment{f: f, off: off, ss: ss, tweakStep: uint64(ss / 512)}
	if c != nil {
		s.g = &keyGuard{c: c}
	}
	return s
}

// crypt en- or decrypts whole sectors of src, starting at sector sec, into
// dst (which may be src); the passthrough copies, unless dst is src (the
// unencrypted reference must not pay a copy the encrypted path does not).
func (s *segment) crypt(dst, src []byte, sec int64, dec bool) error {
	if s.g == nil {
		if len(src) > 0 && &dst[0] != &src[0] {
			copy(dst, src)
		}
		return nil
	}
	return s.g.sectors(dst, src, s.ss, uint64(sec)*s.tweakStep, s.tweakStep, dec)
}

// readSectors reads whole sectors from sector sec into p, decrypting in
// place.
func (s *segment) readSectors(p []byte, sec int64) error {
	if _, err := s.f.ReadAt(p, s.off+sec*int64(s.ss)); err != nil {
		if errors.Is(err, io.EOF) {
			// Inside the segment's size: the file is shorter than its
			// header says, which is no end of input.
			err = io.ErrUnexpectedEOF
		}
		return fmt.Errorf("read sectors %d+%d: %w", sec, len(p)/s.ss, err)
	}
	if err := s.crypt(p, p, sec, true); err != nil {
		clear(p) // ciphertext, but not what the caller asked for
		return fmt.Errorf("read sectors %d+%d: %w", sec, len(p)/s.ss, err)
	}
	return nil
}

// writeSectors encrypts whole sectors of p into scratch, a chunk at a time,
// and writes each with write (the file's WriteAt, or a test's hook) at
// sector sec; p is left as it was.
func (s *segment) writeSectors(p []byte, sec int64, scratch []byte, write func([]byte, int64) error) error {
	if s.g == nil {
		if err := write(p, s.off+sec*int64(s.ss)); err != nil {
			return fmt.Errorf("write sectors %d+%d: %w", sec, len(p)/s.ss, err)
		}
		return nil
	}
	for len(p) > 0 {
		m := min(len(p), len(scratch))
		if err := s.crypt(scratch[:m], p[:m], sec, false); err != nil {
			return fmt.Errorf("write sectors %d+%d: %w", sec, m/s.ss, err)
		}
		if err := write(scratch[:m], s.off+sec*int64(s.ss)); err != nil {
			return fmt.Errorf("write sectors %d+%d: %w", sec, m/s.ss, err)
		}
		p, sec = p[m:], sec+int64(m/s.ss)
	}
	return nil
}

// pwrite is os.File.WriteAt as writeSectors takes it.
func (s *segment) pwrite(p []byte, off int64) error {
	_, err := s.f.WriteAt(p, off)
	return err
}
