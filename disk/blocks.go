package disk

import (
	"errors"
	"fmt"
	"sync"
)

// Blocks is the plaintext view of a volume's data segment for a block
// export (NBD): no cache, no filesystem, safe for many concurrent
// requests. Each request is one pread or pwrite of ciphertext plus the
// cipher's work, so concurrent requests overlap I/O with encryption.
//
// A write is in the image file (not yet durable) when WriteAt returns;
// Sync makes every completed write durable. Requests that are not whole
// sectors are read-modify-written under one lock, so that two of them
// sharing a sector cannot lose each other's bytes.
//
// Blocks and the Device (the filesystem's view) must not both write one
// volume: neither sees the other's writes.
type Blocks struct {
	segment
	size     int64
	readOnly bool

	// mu is held shared by every request and exclusively by Close, so the
	// cipher is never wiped under a request that is still using it.
	mu     sync.RWMutex
	closed bool
	// syncErr is the first failed fdatasync (syncFailed): every later
	// Sync (a FLUSH the kernel retries) fails too.
	syncMu  sync.Mutex
	syncErr error
	rmw     sync.Mutex
	pool    sync.Pool // *[]byte of chunkSize, ciphertext scratch
}

// Blocks returns the image's block view. Image.Close closes it first.
func (im *Image) Blocks() *Blocks {
	if im.blocks == nil {
		d := im.dev
		im.blocks = &Blocks{segment: d.segment, size: d.size, readOnly: d.readOnly}
	}
	return im.blocks
}

// Size is the plaintext size in bytes.
func (b *Blocks) Size() int64 { return b.size }

// SectorSize is the encryption sector size: the smallest write that needs
// no read-modify-write.
func (b *Blocks) SectorSize() int { return b.ss }

// ReadOnly reports whether writes are refused.
func (b *Blocks) ReadOnly() bool { return b.readOnly }

func (b *Blocks) check(n int, off int64, write bool) error {
	if b.closed {
		return ErrClosed
	}
	if write && b.readOnly {
		return ErrReadOnly
	}
	if off < 0 || off > b.size || int64(n) > b.size-off {
		return fmt.Errorf("%d bytes at %d: %w (the volume has %d bytes)", n, off, ErrOutOfRange, b.size)
	}
	return nil
}

// ErrOutOfRange means a request reaches past the end of the volume.
var ErrOutOfRange = errors.New("beyond the end of the volume")

// ReadAt reads plaintext at off. A request that reaches past the end fails
// with ErrOutOfRange; it is not shortened.
func (b *Blocks) ReadAt(p []byte, off int64) (int, error) {
	b.mu.RLock()
	defer b.mu.RUnlock()
	if err := b.check(len(p), off, false); err != nil {
		return 0, fmt.Errorf("read %w", err)
	}
	ss := int64(b.ss)
	if off%ss == 0 && int64(len(p))%ss == 0 {
		return len(p), b.readSectors(p, off/ss)
	}
	first, last := off/ss, (off+int64(len(p))+ss-1)/ss
	buf := make([]byte, (last-first)*ss)
	if err := b.readSectors(buf, first); err != nil {
		return 0, err
	}
	n := copy(p, buf[off-first*ss:])
	clear(buf)
	return n, nil
}

// WriteAt writes plaintext at off. It returns once all of p is in the image
// file (or with an error, after which some sectors may hold the new data
// and others the old, as on a disk).
func (b *Blocks) WriteAt(p []byte, off int64) (int, error) {
	b.mu.RLock()
	defer b.mu.RUnlock()
	if err := b.check(len(p), off, true); err != nil {
		return 0, fmt.Errorf("write %w", err)
	}
	ss := int64(b.ss)
	if off%ss == 0 && int64(len(p))%ss == 0 {
		return len(p), b.writeSectors(p, off/ss)
	}
	// Partial sectors: read, modify, write, serialised against every other
	// partial write so that two sharing a sector both land.
	b.rmw.Lock()
	defer b.rmw.Unlock()
	first, last := off/ss, (off+int64(len(p))+ss-1)/ss
	buf := make([]byte, (last-first)*ss)
	defer clear(buf)
	head, tail := off%ss != 0, (off+int64(len(p)))%ss != 0
	if head {
		if err := b.readSectors(buf[:ss], first); err != nil {
			return 0, err
		}
	}
	if tail && (last-1 != first || !head) {
		if err := b.readSectors(buf[len(buf)-int(ss):], last-1); err != nil {
			return 0, err
		}
	}
	copy(buf[off-first*ss:], p)
	if err := b.writeSectors(buf, first); err != nil {
		return 0, err
	}
	return len(p), nil
}

// writeSectors encrypts whole sectors of p into pooled scratch and writes
// them at sector sec; p is left as it was.
func (b *Blocks) writeSectors(p []byte, sec int64) error {
	sp, _ := b.pool.Get().(*[]byte)
	if sp == nil {
		s := make([]byte, chunkSize)
		sp = &s
	}
	defer b.pool.Put(sp)
	return b.segment.writeSectors(p, sec, *sp, b.pwrite)
}

// Sync makes every completed write durable (fdatasync of the image).
func (b *Blocks) Sync() error {
	b.mu.RLock()
	defer b.mu.RUnlock()
	if b.closed {
		return ErrClosed
	}
	if b.readOnly {
		return nil
	}
	b.syncMu.Lock()
	defer b.syncMu.Unlock()
	if b.syncErr != nil {
		return b.syncErr
	}
	if err := b.datasync(); err != nil {
		b.syncErr = syncFailed(err)
		return b.syncErr
	}
	return nil
}

// close waits for the requests under way, syncs, and refuses all later
// ones; the Image then wipes the cipher.
func (b *Blocks) close() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return nil
	}
	b.closed = true
	if b.readOnly {
		return nil
	}
	b.syncMu.Lock()
	defer b.syncMu.Unlock()
	if b.syncErr != nil {
		return b.syncErr
	}
	if err := b.datasync(); err != nil {
		return syncFailed(err)
	}
	return nil
}
