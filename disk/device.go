// Package disk owns keygate's user-mode view of an encrypted volume and the
// file operations on it: Device, the decrypted (AES-XTS, LUKS2 plain64)
// view of a data segment that go-diskfs can use as backend.Storage, and FS,
// the FAT32/ext4 file operations the CLI and the 9P export call. It also
// holds the workarounds for go-diskfs v1.9.4's ext4 bugs (#425, #429).
//
// It does not own the LUKS2 header (disk/luks2) or the cipher (disk/xts).
package disk

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"sort"
	"sync"
	"time"

	"github.com/diskfs/go-diskfs/backend"

	"github.com/keygate/keygate/disk/xts"
)

// DefaultCacheSize bounds the sector cache (clean and dirty sectors). A few
// MiB holds go-diskfs's hot metadata (bitmaps, GDT, FAT, inode tables)
// so its many small writes are coalesced instead of re-encrypting sectors.
const DefaultCacheSize = 4 << 20

// bypassSize is the request size from which aligned I/O skips the cache
// and goes straight through the batch cipher: file data, not metadata.
const bypassSize = 64 << 10

// chunkSize bounds the scratch buffer used to encrypt big writes.
const chunkSize = 1 << 20

// ErrClosed is returned for any use of a Device after Close.
var ErrClosed = errors.New("disk: device is closed")

// Device is the decrypted view of a volume's data segment. It implements
// go-diskfs's backend.Storage (and backend.WritableFile). All methods are
// safe for concurrent use; one mutex guards the cache and the position.
type Device struct {
	mu sync.Mutex
	segment
	size       int64
	readOnly   bool
	name       string
	closed     bool
	pos        int64
	maxEntries int
	cache      map[int64]*entry
	clock      []*entry
	hand       int
	free       [][]byte
	scratch    []byte
	cut        *writeCut // tests only (export_test.go): a crash after so many sectors
	// syncErr is the first failed fdatasync (syncFailed): every later
	// Sync and Close fails with it.
	syncErr error
}

// writeCut stops a Device's writes to its file after budget more sectors,
// the last write torn at a sector boundary, and fails every later write
// and Sync: what a process killed at that instant leaves in the file.
// written counts the sectors that reached the file.
type writeCut struct {
	budget, written int64
	cut             bool
}

// errCut is what writes and syncs return once a writeCut has cut them off.
var errCut = errors.New("disk: writes cut off (simulated crash)")

// writeFile is the one place a Device writes its file, so that a test can
// cut it off.
func (d *Device) writeFile(p []byte, off int64) error {
	if c := d.cut; c != nil {
		n := int64(len(p) / d.ss)
		if c.cut || n > c.budget {
			n = max(0, min(n, c.budget))
			if n > 0 && !c.cut {
				if _, err := d.f.WriteAt(p[:n*int64(d.ss)], off); err != nil {
					return err
				}
				c.written += n
			}
			c.cut, c.budget = true, 0
			return errCut
		}
		c.budget -= n
		c.written += n
	}
	_, err := d.f.WriteAt(p, off)
	return err
}

type entry struct {
	sector int64
	data   []byte
	dirty  bool
	ref    bool
	slot   int
}

// Option configures a Device.
type Option func(*Device)

// WithCacheSize sets the sector cache bound in bytes (at least 16 sectors).
func WithCacheSize(n int) Option { return func(d *Device) { d.maxEntries = n / d.ss } }

// ReadOnly makes every write fail and Writable return an error.
func ReadOnly() Option { return func(d *Device) { d.readOnly = true } }

// WithName sets the name Stat reports (default "keygate-volume").
func WithName(name string) Option { return func(d *Device) { d.name = name } }

// NewDevice returns the plaintext view of size bytes of f starting at byte
// offset, encrypted with c in sectors of sectorSize bytes (512 or 4096).
// The XTS tweak of sector i of the segment is i*sectorSize/512, as LUKS2's
// plain64 counts in 512-byte units. A nil c gives an unencrypted
// passthrough (the performance reference). The Device does not own f or c:
// Close flushes but closes neither.
func NewDevice(f *os.File, offset, size int64, sectorSize int, c *xts.Cipher, opts ...Option) (*Device, error) {
	if sectorSize != 512 && sectorSize != 4096 {
		return nil, fmt.Errorf("new device: sector size %d is not 512 or 4096", sectorSize)
	}
	if offset < 0 || offset%int64(sectorSize) != 0 {
		return nil, fmt.Errorf("new device: offset %d is not a multiple of the sector size %d", offset, sectorSize)
	}
	if size <= 0 || size%int64(sectorSize) != 0 {
		return nil, fmt.Errorf("new device: size %d is not a positive multiple of the sector size %d", size, sectorSize)
	}
	d := &Device{segment: newSegment(f, offset, sectorSize, c), size: size,
		name: "keygate-volume", cache: map[int64]*entry{}}
	d.maxEntries = DefaultCacheSize / sectorSize
	for _, o := range opts {
		o(d)
	}
	if d.maxEntries < 16 {
		d.maxEntries = 16
	}
	return d, nil
}

// interface guards: go-diskfs needs Storage, and writes through WritableFile.
var (
	_ backend.Storage      = (*Device)(nil)
	_ backend.WritableFile = (*Device)(nil)
)

// Size is the plaintext size in bytes.
func (d *Device) Size() int64 { return d.size }

// SectorSize is the encryption sector size.
func (d *Device) SectorSize() int { return d.ss }

// Sys refuses: an ioctl on the file descriptor would act on the ciphertext.
// go-diskfs only asks for it on block devices and to fsync after mkfs, and
// copes with the error; Sync does the fsync instead.
func (d *Device) Sys() (*os.File, error) { return nil, backend.ErrNotSuitable }

// Writable returns d itself, unless the Device is read-only.
func (d *Device) Writable() (backend.WritableFile, error) {
	if d.readOnly {
		return nil, backend.ErrIncorrectOpenMode
	}
	return d, nil
}

// Path is empty: the backing file holds ciphertext, so no tool should be
// pointed at it as if it were this filesystem.
func (d *Device) Path() string { return "" }

// Stat reports a regular file of the plaintext size; go-diskfs checks the
// mode to decide between a file and a block device.
func (d *Device) Stat() (fs.FileInfo, error) {
	return devInfo{name: d.name, size: d.size}, nil
}

type devInfo struct {
	name string
	size int64
}

func (i devInfo) Name() string       { return i.name }
func (i devInfo) Size() int64        { return i.size }
func (i devInfo) Mode() fs.FileMode  { return 0o600 }
func (i devInfo) ModTime() time.Time { return time.Time{} }
func (i devInfo) IsDir() bool        { return false }
func (i devInfo) Sys() any           { return nil }

// Read reads from the current position (fs.File).
func (d *Device) Read(p []byte) (int, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	n, err := d.readAt(p, d.pos)
	d.pos += int64(n)
	return n, err
}

// Seek sets the position for Read.
func (d *Device) Seek(offset int64, whence int) (int64, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	switch whence {
	case io.SeekStart:
	case io.SeekCurrent:
		offset += d.pos
	case io.SeekEnd:
		offset += d.size
	default:
		return d.pos, fmt.Errorf("seek: bad whence %d", whence)
	}
	if offset < 0 {
		return d.pos, fmt.Errorf("seek: negative position %d", offset)
	}
	d.pos = offset
	return offset, nil
}

// ReadAt reads plaintext at off. Unaligned parts and small requests go
// through the sector cache; big aligned runs are decrypted in place in p.
func (d *Device) ReadAt(p []byte, off int64) (int, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.readAt(p, off)
}

func (d *Device) readAt(p []byte, off int64) (int, error) {
	if d.closed {
		return 0, ErrClosed
	}
	if off < 0 {
		return 0, fmt.Errorf("read at %d: negative offset", off)
	}
	if off >= d.size {
		return 0, io.EOF
	}
	var eof error
	if rest := d.size - off; int64(len(p)) > rest {
		p, eof = p[:rest], io.EOF
	}
	ss := int64(d.ss)
	n := 0
	for n < len(p) {
		pos := off + int64(n)
		sec, in := pos/ss, int(pos%ss)
		if in == 0 && len(p)-n >= bypassSize {
			run := (len(p) - n) / d.ss * d.ss
			if err := d.readDirect(p[n:n+run], sec); err != nil {
				return n, err
			}
			n += run
			continue
		}
		e, err := d.get(sec, true)
		if err != nil {
			return n, err
		}
		n += copy(p[n:], e.data[in:])
	}
	return n, eof
}

// readDirect reads whole sectors starting at sector sec into p, decrypting
// in place, then overlays any dirty cached sector, which is newer.
func (d *Device) readDirect(p []byte, sec int64) error {
	if err := d.readSectors(p, sec); err != nil {
		return err
	}
	d.eachCached(sec, int64(len(p)/d.ss), func(e *entry) {
		if e.dirty {
			copy(p[(e.sector-sec)*int64(d.ss):], e.data)
		}
	})
	return nil
}

// eachCached calls fn for each cached sector in [sec, sec+count), walking
// whichever of the range and the cache is smaller.
func (d *Device) eachCached(sec, count int64, fn func(*entry)) {
	if len(d.cache) == 0 {
		return
	}
	if count <= int64(len(d.cache)) {
		for s := sec; s < sec+count; s++ {
			if e, ok := d.cache[s]; ok {
				fn(e)
			}
		}
		return
	}
	var hit []*entry // fn may drop entries, which reorders d.clock
	for _, e := range d.clock {
		if e.sector >= sec && e.sector < sec+count {
			hit = append(hit, e)
		}
	}
	for _, e := range hit {
		fn(e)
	}
}

// WriteAt writes plaintext at off. Partial sectors are read, modified and
// written back through the cache; big aligned runs are encrypted straight
// to the file and replace whatever the cache held for them.
func (d *Device) WriteAt(p []byte, off int64) (int, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.writeAt(p, off)
}

func (d *Device) writeAt(p []byte, off int64) (int, error) {
	if d.closed {
		return 0, ErrClosed
	}
	if d.readOnly {
		return 0, backend.ErrIncorrectOpenMode
	}
	if off < 0 || off+int64(len(p)) > d.size {
		return 0, fmt.Errorf("write %d bytes at %d: beyond the end of the %d-byte device", len(p), off, d.size)
	}
	ss := int64(d.ss)
	n := 0
	for n < len(p) {
		pos := off + int64(n)
		sec, in := pos/ss, int(pos%ss)
		if in == 0 && len(p)-n >= bypassSize {
			run := (len(p) - n) / d.ss * d.ss
			if err := d.writeDirect(p[n:n+run], sec); err != nil {
				return n, err
			}
			n += run
			continue
		}
		// a whole-sector overwrite needs no read of the old content
		whole := in == 0 && len(p)-n >= d.ss
		e, err := d.get(sec, !whole)
		if err != nil {
			return n, err
		}
		n += copy(e.data[in:], p[n:])
		e.dirty = true
	}
	return n, nil
}

func (d *Device) writeDirect(p []byte, sec int64) error {
	count := int64(len(p) / d.ss)
	d.eachCached(sec, count, d.drop)
	if d.scratch == nil {
		d.scratch = make([]byte, chunkSize)
	}
	return d.writeSectors(p, sec, d.scratch, d.writeFile)
}

// get returns the cache entry for sector sec, loading (and decrypting) it
// when load is set; otherwise a new entry's content is undefined and the
// caller overwrites all of it.
func (d *Device) get(sec int64, load bool) (*entry, error) {
	if e, ok := d.cache[sec]; ok {
		e.ref = true
		return e, nil
	}
	if len(d.cache) >= d.maxEntries {
		if err := d.evict(); err != nil {
			return nil, err
		}
	}
	var buf []byte
	if k := len(d.free); k > 0 {
		buf, d.free = d.free[k-1], d.free[:k-1]
	} else {
		buf = make([]byte, d.ss)
	}
	if load {
		if err := d.readSectors(buf, sec); err != nil {
			d.free = append(d.free, buf)
			return nil, err
		}
	}
	e := &entry{sector: sec, data: buf, ref: true, slot: len(d.clock)}
	d.cache[sec] = e
	d.clock = append(d.clock, e)
	return e, nil
}

// evict frees one slot with the CLOCK algorithm. A dirty victim is first
// written together with the dirty sectors that follow it, so that eviction
// under a stream of small writes still produces large writes.
func (d *Device) evict() error {
	for {
		if d.hand >= len(d.clock) {
			d.hand = 0
		}
		e := d.clock[d.hand]
		if e.ref {
			e.ref = false
			d.hand++
			continue
		}
		if e.dirty {
			run := []*entry{e}
			for s := e.sector + 1; ; s++ {
				n, ok := d.cache[s]
				if !ok || !n.dirty || len(run) >= chunkSize/d.ss {
					break
				}
				run = append(run, n)
			}
			if err := d.writeRun(run); err != nil {
				return err
			}
		}
		d.drop(e)
		return nil
	}
}

// drop removes e from the cache, wiping its plaintext.
func (d *Device) drop(e *entry) {
	clear(e.data)
	d.free = append(d.free, e.data)
	delete(d.cache, e.sector)
	last := len(d.clock) - 1
	d.clock[e.slot] = d.clock[last]
	d.clock[e.slot].slot = e.slot
	d.clock[last] = nil
	d.clock = d.clock[:last]
}

// writeRun encrypts and writes consecutive dirty sectors with one pwrite.
func (d *Device) writeRun(run []*entry) error {
	n := len(run) * d.ss
	if len(d.scratch) < n {
		d.scratch = make([]byte, max(n, chunkSize))
	}
	buf := d.scratch[:n]
	for i, e := range run {
		copy(buf[i*d.ss:], e.data)
	}
	sec := run[0].sector
	err := d.crypt(buf, buf, sec, false)
	if err == nil {
		err = d.writeFile(buf, d.off+sec*int64(d.ss))
	}
	if d.g == nil || err != nil {
		clear(buf) // plaintext, or not yet encrypted
	}
	if err != nil {
		return fmt.Errorf("write sectors %d+%d: %w", sec, len(run), err)
	}
	for _, e := range run {
		e.dirty = false
	}
	return nil
}

// Flush writes every dirty sector to the file, in sector order and in
// runs of consecutive sectors. It does not fsync; Sync does.
func (d *Device) Flush() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return ErrClosed
	}
	return d.flush()
}

func (d *Device) flush() error {
	var dirty []*entry
	for _, e := range d.clock {
		if e.dirty {
			dirty = append(dirty, e)
		}
	}
	sort.Slice(dirty, func(i, j int) bool { return dirty[i].sector < dirty[j].sector })
	for i := 0; i < len(dirty); {
		j := i + 1
		for j < len(dirty) && dirty[j].sector == dirty[j-1].sector+1 && j-i < chunkSize/d.ss {
			j++
		}
		if err := d.writeRun(dirty[i:j]); err != nil {
			return err
		}
		i = j
	}
	return nil
}

// Sync flushes the cache and fsyncs the file.
func (d *Device) Sync() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return ErrClosed
	}
	if d.readOnly {
		return nil
	}
	if d.syncErr != nil {
		return d.syncErr
	}
	if err := d.flush(); err != nil {
		return err
	}
	if d.cut != nil && d.cut.cut {
		return errCut
	}
	if err := d.datasync(); err != nil {
		d.syncErr = syncFailed(err)
		return d.syncErr
	}
	return nil
}

// Close flushes and fsyncs, then wipes and drops the cache. It closes
// neither the file nor the cipher, which belong to the caller.
func (d *Device) Close() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return nil
	}
	err := d.syncErr
	if !d.readOnly && err == nil {
		if err = d.flush(); err == nil {
			if e := d.datasync(); e != nil {
				err = syncFailed(e)
			}
		}
	}
	for len(d.clock) > 0 {
		d.drop(d.clock[0])
	}
	d.free, d.scratch, d.closed = nil, nil, true
	return err
}
