package disk

import (
	"errors"
	"fmt"
	"io"
	"os"
	"sync"

	"golang.org/x/sys/unix"

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
	faults    *syncFaults // tests only (export_test.go)
}

// syncFaults makes fdatasyncs of a segment's file report errors the
// kernel did not, for tests: a real writeback error (EIO from a failing
// disk) cannot be produced on a machine without device-mapper.
type syncFaults struct {
	mu   sync.Mutex
	next []error
}

func newSegment(f *os.File, off int64, ss int, c *xts.Cipher) segment {
	s := segment{f: f, off: off, ss: ss, tweakStep: uint64(ss / 512), faults: &syncFaults{}}
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

// datasync is fdatasync(2) of the file: the data written and what reading
// it back needs (the file's size and block map) are durable when it
// returns, which is all a crash can test; only the host file's own times
// are left to the next journal commit. A Device syncs at every epoch of a
// flush (ext4write.go), each a few sectors after the first, so skipping the
// host's inode update each time matters to a commit's cost.
func (s *segment) datasync() error {
	rc, err := s.f.SyscallConn()
	if err != nil {
		return s.f.Sync()
	}
	if cerr := rc.Control(func(fd uintptr) {
		err = ignoringEINTR(func() error { return unix.Fdatasync(int(fd)) })
	}); cerr != nil {
		return cerr
	}
	s.faults.mu.Lock()
	if len(s.faults.next) > 0 && err == nil {
		err, s.faults.next = s.faults.next[0], s.faults.next[1:]
	}
	s.faults.mu.Unlock()
	if err != nil {
		return &os.PathError{Op: "fdatasync", Path: s.f.Name(), Err: err}
	}
	return nil
}

// syncFailed is the error of a failed fdatasync, which every later sync
// of the image returns too. Linux reports a writeback error to one
// fdatasync only and marks the pages it could not write clean, so the next
// fdatasync would succeed with those writes lost; a database that retries
// its commit's fsync must not be told the retry made it durable.
func syncFailed(err error) error {
	return fmt.Errorf("sync image: %w (writes since the last good sync may be lost: stop, then check the volume with e2fsck before using it again)", err)
}

func ignoringEINTR(fn func() error) error {
	for {
		if err := fn(); err != unix.EINTR {
			return err
		}
	}
}

// pwrite is os.File.WriteAt as writeSectors takes it.
func (s *segment) pwrite(p []byte, off int64) error {
	_, err := s.f.WriteAt(p, off)
	return err
}
