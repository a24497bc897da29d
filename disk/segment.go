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
// i*ss/512, as LUKS2's plain64 counts in 512-byte units; a nil c is the
// unencrypted passthrough (the performance reference).
type segment struct {
	f         *os.File
	off       int64
	ss        int
	tweakStep uint64
	c         *xts.Cipher
}

func newSegment(f *os.File, off int64, ss int, c *xts.Cipher) segment {
	return segment{f: f, off: off, ss: ss, tweakStep: uint64(ss / 512), c: c}
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
	if s.c != nil {
		s.c.DecryptSectors(p, p, s.ss, uint64(sec)*s.tweakStep, s.tweakStep)
	}
	return nil
}

// writeSectors encrypts whole sectors of p into scratch, a chunk at a time,
// and writes each with write (the file's WriteAt, or a test's hook) at
// sector sec; p is left as it was.
func (s *segment) writeSectors(p []byte, sec int64, scratch []byte, write func([]byte, int64) error) error {
	if s.c == nil {
		if err := write(p, s.off+sec*int64(s.ss)); err != nil {
			return fmt.Errorf("write sectors %d+%d: %w", sec, len(p)/s.ss, err)
		}
		return nil
	}
	for len(p) > 0 {
		m := min(len(p), len(scratch))
		s.c.EncryptSectors(scratch[:m], p[:m], s.ss, uint64(sec)*s.tweakStep, s.tweakStep)
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
