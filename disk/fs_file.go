package disk

// This file gives FS what a file server needs beyond whole-file Get and
// Put: files open for reading and writing at any offset, truncation,
// rename, and errors a server can map to errnos.
//
// Writes to an open file are kept in memory, copy-on-write in 64 KiB pages
// over the file's on-disk content, until Sync, the Close of a writable
// handle, or (on ext4) writeback once writeBackPages are waiting.
//
// On ext4 that flush writes the pages into the file's own blocks and
// allocates blocks for the rest (ext4write.go): it costs what was written
// since the last flush, and a crash at any point leaves the file as of its
// last completed flush or newer (each sector or block old or new), never
// with bytes no one wrote; the next writable OpenFS repairs the block
// bitmaps from the flush's intent record. Layouts beyond ext4write.go
// (deep extent trees, unwritten extents) and FAT take the whole-file path
// instead: Put's replace (new content beside the old in .NAME.keygate-put,
// then swapped in), which rewrites the file and needs room for a second
// copy. On ext4 the swap is an atomic rename (ext4rename.go): a crash
// leaves the old file or the new one. On FAT it is remove-then-rename: a
// crash between them leaves the old name gone with the complete new
// content in the temporary file. docs/disk.md ("9P export") says this for
// operators.

import (
	"errors"
	"fmt"
	"io"
	iofs "io/fs"
	"os"
	"path"
	"strings"
	"sync"
)

var (
	// ErrNotDir means a path component, or a rename target, is a file
	// where a directory is needed.
	ErrNotDir = errors.New("not a directory")
	// ErrIsDir means a file operation was asked of a directory.
	ErrIsDir = errors.New("is a directory")
	// ErrReadOnly means a change was asked of a volume opened read-only.
	ErrReadOnly = errors.New("volume is open read-only (reopen it writable)")
	// ErrTooLarge means a file would grow past what the filesystem (or the
	// volume) can hold.
	ErrTooLarge = errors.New("file too large")
	// ErrCannotMove means Rename cannot move a non-empty FAT directory to
	// another directory: go-diskfs has no rename across FAT directories.
	// Callers do what mv does on EXDEV: copy, then remove.
	ErrCannotMove = errors.New("cannot move a non-empty directory here (copy it, then remove the original)")
	// ErrInvalid means an argument makes no sense, such as renaming a
	// directory into itself or the root.
	ErrInvalid = iofs.ErrInvalid
)

const pageSize = 64 << 10

// writeBackPages is how many written pages an ext4 file holds before they
// are written in place without waiting for Sync, as a kernel's writeback
// would: it bounds the memory a big write takes (twice this while a
// writeback is in flight, see writeBack), and a page reused from pagePool
// is one the CPU and the kernel already have mapped.
const writeBackPages = 256 // 16 MiB

// pagePool recycles pages, wiped, between flushes.
var pagePool = sync.Pool{New: func() any { return new([pageSize]byte) }}

// newPage is a zeroed page.
func newPage() []byte { return pagePool.Get().(*[pageSize]byte)[:] }

// dropPages wipes the file's pages (file data is not key material, but
// need not linger either) and gives them back to the pool.
func (of *openFile) dropPages() {
	for _, pg := range of.pages {
		clear(pg)
		pagePool.Put((*[pageSize]byte)(pg))
	}
	of.pages = nil
}

// openFile is the state shared by every handle on one path, so that all
// of them see each other's unflushed writes, as with a kernel page cache.
// All fields are guarded by fs.mu.
type openFile struct {
	fs      *FS
	path    string // clean form
	refs    int
	base    io.ReaderAt // content as of the last flush; valid while the file is unchanged on disk
	baseLen int64       // bytes of base still visible (lowered by truncation)
	size    int64
	pages   map[int64][]byte // written pages, by page index
	dirty   bool
	noWB    bool // in-place writeback failed or is not possible: keep pages until Sync
	gone    bool // removed or replaced underneath: nothing to flush to
	// the pages a writeback in flight (FS.pending) is writing, less those
	// written again since: settle drops these once the flush is complete
	inflight map[int64]bool
}

// File is a handle on a file opened with OpenFile. It is safe for
// concurrent use.
type File struct {
	of       *openFile
	writable bool
	closed   bool
}

// fileKey is the registry key of a clean path: FAT names are
// case-insensitive.
func (f *FS) fileKey(p string) string {
	if f.typ == FAT32 {
		return strings.ToLower(p)
	}
	return p
}

// ReadOnly reports whether the volume was opened read-only.
func (f *FS) ReadOnly() bool { return f.dev.readOnly }

// Size is the size of the volume the filesystem spans.
func (f *FS) Size() int64 { return f.dev.Size() }

func (f *FS) maxFileSize() int64 {
	if f.typ == FAT32 {
		return min(0xFFFFFFFF, f.dev.Size())
	}
	return f.dev.Size()
}

// OpenFile opens the regular file p. flag takes os.O_RDONLY, os.O_WRONLY
// or os.O_RDWR, with os.O_CREATE, os.O_EXCL and os.O_TRUNC meaning what
// they mean to open(2). A created file exists on the volume (empty) when
// OpenFile returns; written content is stored by Sync or by the last Close
// of a writable handle.
func (f *FS) OpenFile(p string, flag int) (*File, error) {
	f.lock()
	defer f.mu.Unlock()
	p = clean(p)
	writable := flag&(os.O_WRONLY|os.O_RDWR) != 0 || flag&(os.O_TRUNC|os.O_CREATE) != 0
	if writable && f.dev.readOnly {
		return nil, fmt.Errorf("open %s: %w", display(p), ErrReadOnly)
	}
	if p == "." {
		return nil, fmt.Errorf("open /: %w", ErrIsDir)
	}
	if f.files == nil {
		f.files = map[string]*openFile{}
	}
	of := f.files[f.fileKey(p)]
	if of != nil && flag&(os.O_CREATE|os.O_EXCL) == os.O_CREATE|os.O_EXCL {
		return nil, fmt.Errorf("create %s: %w", display(p), iofs.ErrExist)
	}
	if of == nil {
		fi, err := f.stat(p)
		switch {
		case errors.Is(err, iofs.ErrNotExist) && flag&os.O_CREATE != 0:
			if err := f.mustBeDir(path.Dir(p)); err != nil {
				return nil, fmt.Errorf("create %s: %w", display(p), err)
			}
			if err := f.put(p, strings.NewReader(""), 0); err != nil {
				return nil, err
			}
			if err := f.sync(); err != nil {
				return nil, fmt.Errorf("create %s: %w", display(p), err)
			}
		case err != nil:
			return nil, err
		case fi.IsDir:
			return nil, fmt.Errorf("open %s: %w", display(p), ErrIsDir)
		case flag&(os.O_CREATE|os.O_EXCL) == os.O_CREATE|os.O_EXCL:
			return nil, fmt.Errorf("create %s: %w", display(p), iofs.ErrExist)
		}
		of = &openFile{fs: f, path: p}
		if err := of.reopen(); err != nil {
			return nil, err
		}
		f.files[f.fileKey(p)] = of
	}
	of.refs++
	if flag&os.O_TRUNC != 0 && writable {
		of.truncate(0)
	}
	return &File{of: of, writable: writable}, nil
}

// reopen points base at the file's current content on disk.
func (of *openFile) reopen() error {
	f, p := of.fs, of.path
	fi, err := f.stat(p)
	if err != nil {
		return err
	}
	if of.base, err = f.openUnlocked(p); err != nil {
		return err
	}
	of.dropPages()
	of.baseLen, of.size, of.dirty = fi.Size, fi.Size, false
	return nil
}

// fatBase reads a go-diskfs FAT file at an offset. Unlike fatReader it
// takes no lock: openFile calls it with fs.mu held.
type fatBase struct{ f io.ReadSeeker }

func (b *fatBase) ReadAt(p []byte, off int64) (int, error) {
	if _, err := b.f.Seek(off, io.SeekStart); err != nil {
		return 0, err
	}
	return io.ReadFull(b.f, p)
}

// detach cuts an open file at p off from the path before p is removed or
// replaced: like an unlinked file on Unix, its handles keep the content
// they saw (read into memory now, as its blocks are about to be freed),
// and its writes go nowhere.
func (f *FS) detach(p string) {
	k := f.fileKey(p)
	of := f.files[k]
	if of == nil {
		return
	}
	delete(f.files, k)
	of.gone = true
	if of.pages == nil {
		of.pages = map[int64][]byte{}
	}
	for pg := int64(0); pg*pageSize < of.size; pg++ {
		if of.pages[pg] == nil {
			b := make([]byte, pageSize)
			if err := of.readBase(b[:min(pageSize, of.size-pg*pageSize)], pg*pageSize); err != nil {
				clear(b) // unreadable: the handle reads zeros rather than freed blocks
			}
			of.pages[pg] = b
		}
	}
	of.base, of.baseLen = nil, 0
}

// readBase fills b from the flushed content at off; bytes past baseLen
// (truncated away, or never written) read as zeros.
func (of *openFile) readBase(b []byte, off int64) error {
	n := 0
	if off < of.baseLen && of.base != nil {
		n = int(min(int64(len(b)), of.baseLen-off))
		m, err := of.base.ReadAt(b[:n], off)
		if m < n && err != nil {
			return fmt.Errorf("read %s at %d: %w", display(of.path), off+int64(m), err)
		}
	}
	clear(b[n:])
	return nil
}

func (of *openFile) readAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("read %s at %d: %w", display(of.path), off, ErrInvalid)
	}
	if off >= of.size {
		return 0, io.EOF
	}
	var eof error
	if int64(len(p)) > of.size-off {
		p, eof = p[:of.size-off], io.EOF
	}
	for i := 0; i < len(p); {
		pos := off + int64(i)
		if pg, ok := of.pages[pos/pageSize]; ok {
			m := copy(p[i:], pg[pos%pageSize:])
			i += m
			continue
		}
		// read the whole run of unwritten pages in one go
		end := (pos/pageSize + 1) * pageSize
		for end < off+int64(len(p)) && of.pages[end/pageSize] == nil {
			end += pageSize
		}
		m := int(min(end-pos, int64(len(p)-i)))
		if err := of.readBase(p[i:i+m], pos); err != nil {
			return i, err
		}
		i += m
	}
	return len(p), eof
}

func (of *openFile) writeAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("write %s at %d: %w", display(of.path), off, ErrInvalid)
	}
	if end := off + int64(len(p)); end > of.fs.maxFileSize() || end < off {
		return 0, fmt.Errorf("write %s: %d bytes: %w for this volume", display(of.path), end, ErrTooLarge)
	}
	if of.pages == nil {
		of.pages = map[int64][]byte{}
	}
	for i := 0; i < len(p); {
		pos := off + int64(i)
		idx := pos / pageSize
		pg := of.pages[idx]
		if pg != nil && of.inflight[idx] {
			// the writeback in flight is writing this page without the
			// lock: write a copy, and free the original once it is done
			cp := newPage()
			copy(cp, pg)
			of.fs.pending.retired = append(of.fs.pending.retired, pg)
			of.pages[idx], pg = cp, cp
		}
		if pg == nil {
			pg = newPage()
			if start := idx * pageSize; start < of.size {
				if err := of.readBase(pg[:min(pageSize, of.size-start)], start); err != nil {
					return i, err
				}
			}
			of.pages[idx] = pg
		}
		delete(of.inflight, idx) // newer than what the writeback in flight has
		i += copy(pg[pos%pageSize:], p[i:])
	}
	of.size = max(of.size, off+int64(len(p)))
	of.dirty = true
	return len(p), nil
}

func (of *openFile) truncate(n int64) {
	if n < of.size {
		for idx := range of.pages {
			if idx*pageSize >= n {
				delete(of.pages, idx)
			}
		}
		if pg := of.pages[n/pageSize]; pg != nil {
			clear(pg[n%pageSize:]) // so that growing again reads zeros
		}
		of.baseLen = min(of.baseLen, n)
	}
	of.size = n
	of.dirty = true
}

// flush stores the file's content with Put's atomic replace and syncs.
func (of *openFile) flush() error {
	if !of.dirty || of.gone {
		return nil
	}
	f := of.fs
	if f.typ == Ext4 {
		err := of.flushInPlace()
		if err == nil {
			f.inPlace++
			return of.reopen()
		}
		if !errors.Is(err, errFallback) {
			return err // the writes stay, as below
		}
	}
	f.whole++
	if err := f.store(of); err != nil {
		// keep the writes: the caller may free space and try again
		return err
	}
	if err := of.reopen(); err != nil {
		return err
	}
	return f.sync()
}

// flushInPlace writes the pages in place on ext4 (ext4write.go). The
// block holding the flushed content's end is written whole when the file
// now extends past it, so that its tail reads as the zeros readBase gave
// rather than whatever the block held past the old end.
func (of *openFile) flushInPlace() error {
	if err := of.tailPage(); err != nil {
		return err
	}
	return of.fs.flushExt4(of)
}

// tailPage adds the page holding the flushed content's end when the file
// now extends past it (see flushInPlace).
func (of *openFile) tailPage() error {
	bs := of.fs.ext.bs
	if idx := of.baseLen / pageSize; of.baseLen%bs != 0 && of.baseLen < of.size && of.pages[idx] == nil {
		pg := newPage()
		start := idx * pageSize
		if _, err := of.readAt(pg[:min(pageSize, of.size-start)], start); err != nil && err != io.EOF {
			return err
		}
		if of.pages == nil {
			of.pages = map[int64][]byte{}
		}
		of.pages[idx] = pg
	}
	return nil
}

// store writes the file's content to disk with Put's replace.
func (f *FS) store(of *openFile) error {
	return f.put(of.path, &seqReader{of: of}, of.size)
}

// seqReader reads an openFile from the start, for put.
type seqReader struct {
	of  *openFile
	off int64
}

func (r *seqReader) Read(p []byte) (int, error) {
	n, err := r.of.readAt(p, r.off)
	r.off += int64(n)
	return n, err
}

func (h *File) check(write bool) error {
	if h.closed {
		return fmt.Errorf("%s: %w", display(h.of.path), iofs.ErrClosed)
	}
	if write && !h.writable {
		return fmt.Errorf("%s: opened read-only: %w", display(h.of.path), iofs.ErrPermission)
	}
	return nil
}

// ReadAt reads len(p) bytes at off, or fewer with io.EOF at the end.
func (h *File) ReadAt(p []byte, off int64) (int, error) {
	h.of.fs.mu.Lock()
	defer h.of.fs.mu.Unlock()
	if err := h.check(false); err != nil {
		return 0, err
	}
	return h.of.readAt(p, off)
}

// WriteAt writes p at off, extending the file (with zeros) as needed.
func (h *File) WriteAt(p []byte, off int64) (int, error) {
	h.of.fs.mu.Lock()
	defer h.of.fs.mu.Unlock()
	if err := h.check(true); err != nil {
		return 0, err
	}
	n, err := h.of.writeAt(p, off)
	if err == nil && len(h.of.pages)-len(h.of.inflight) >= writeBackPages {
		h.of.writeBack()
	}
	return n, err
}

// writeBack writes the pages in place on ext4 before Sync asks for it,
// as a kernel's writeback would. It plans the flush and writes its
// metadata with f.mu held, then hands the pages' data and the sync that
// ends epoch B to a goroutine of their own and returns: the data is
// encrypted, written and made durable while the writer sends more, and
// the next use of the filesystem completes the flush (FS.settle). The
// goroutine reads only the pages it was given, which writeAt leaves alone
// from then on (it writes a copy), and the Device, whose lock it takes;
// nothing else writes the Device until settle, which every other
// operation on the filesystem runs first. A failure is not the writer's:
// the pages stay, and Sync (which may take the whole-file path) reports
// what is wrong.
func (of *openFile) writeBack() {
	f := of.fs
	if f.typ != Ext4 || of.gone || of.noWB {
		return
	}
	f.settle() // one flush in flight at a time
	if of.noWB {
		return
	}
	if err := of.tailPage(); err != nil {
		of.noWB = true
		return
	}
	p, pages, err := f.beginExt4(of)
	if err != nil {
		of.noWB = true
		return
	}
	of.inflight = make(map[int64]bool, len(pages))
	for _, dp := range pages {
		of.inflight[dp.idx] = true
	}
	pf := &pendingFlush{of: of, p: p, done: make(chan struct{})}
	go func() {
		defer close(pf.done)
		if writeBackHook != nil {
			writeBackHook(pages, false)
		}
		if pf.err = p.writeData(pages); pf.err == nil {
			pf.err = p.m.dev.Sync()
		}
		if writeBackHook != nil {
			writeBackHook(pages, true)
		}
	}()
	f.pending = pf
}

// writeBackHook, set by tests only, is called on a writeback's goroutine
// before it writes its pages (done false) and once they are written and
// synced (done true).
var writeBackHook func(pages []dataPage, done bool)

// pendingFlush is a writeback whose epoch B is being written and synced
// on its own goroutine (ext4write.go): until done is closed, and then
// until settle completes the flush, the image holds what a crash in the
// middle of that flush would leave, which the flush's intent record
// repairs, and no other change may come between it and the rest of the
// flush.
type pendingFlush struct {
	of   *openFile
	p    *ext4Flush
	done chan struct{} // closed when epoch B is written and synced, or failed
	err  error         // why epoch B failed; read after done
	// pages the writeback is writing that writeAt has since replaced by
	// copies: freed once the writeback is done with them
	retired [][]byte
}

// lock takes f.mu for an operation on the filesystem, and completes the
// writeback in flight first: everything but reads and writes of open
// files' pages must see the flush whole.
func (f *FS) lock() {
	f.mu.Lock()
	f.settle()
}

// settle completes the writeback in flight, if any: it waits for the
// writeback's goroutine to end epoch B, writes the rest of the flush, and
// drops the pages it stored, keeping those written since it started. A
// failure leaves every page in memory for Sync, as a failed writeBack
// does. f.mu is held.
func (f *FS) settle() {
	pf := f.pending
	if pf == nil {
		return
	}
	f.pending = nil
	<-pf.done
	of := pf.of
	defer func() {
		of.inflight = nil
		for _, pg := range pf.retired {
			clear(pg)
			pagePool.Put((*[pageSize]byte)(pg))
		}
	}()
	if pf.err != nil {
		_ = f.failedExt4(of, pf.err) // repair the bitmaps from the intent, as a crash would need
		of.noWB = true
		return
	}
	pf.p.synced = true
	if err := f.finishExt4(of, pf.p); err != nil {
		of.noWB = true
		return
	}
	f.inPlace++
	fi, err := f.stat(of.path)
	if err == nil {
		of.base, err = f.openUnlocked(of.path)
	}
	if err != nil {
		of.noWB = true
		return
	}
	for idx := range of.inflight {
		clear(of.pages[idx])
		pagePool.Put((*[pageSize]byte)(of.pages[idx]))
		delete(of.pages, idx)
	}
	// writes since the start may only have added pages or grown the
	// file: a truncation settles first
	of.baseLen = fi.Size
	of.dirty = len(of.pages) > 0 || of.size != fi.Size
}

// Truncate sets the file's length to n, cutting or extending with zeros.
func (h *File) Truncate(n int64) error {
	h.of.fs.lock()
	defer h.of.fs.mu.Unlock()
	if err := h.check(true); err != nil {
		return err
	}
	if n < 0 {
		return fmt.Errorf("truncate %s to %d: %w", display(h.of.path), n, ErrInvalid)
	}
	if n > h.of.fs.maxFileSize() {
		return fmt.Errorf("truncate %s to %d: %w for this volume", display(h.of.path), n, ErrTooLarge)
	}
	h.of.truncate(n)
	return nil
}

// Size is the file's current length, unflushed writes included.
func (h *File) Size() int64 {
	h.of.fs.mu.Lock()
	defer h.of.fs.mu.Unlock()
	return h.of.size
}

// Sync stores the file's content durably: when it returns, the writes
// made through every handle on the file survive a crash.
func (h *File) Sync() error {
	h.of.fs.lock()
	defer h.of.fs.mu.Unlock()
	if err := h.check(false); err != nil {
		return err
	}
	return h.of.flush()
}

// Close releases the handle. Closing a writable handle stores the file's
// content durably, as Sync does; if that fails the error says so and the
// writes stay in memory while other handles remain open, and are lost
// when none does.
func (h *File) Close() error {
	f := h.of.fs
	f.lock()
	defer f.mu.Unlock()
	if h.closed {
		return nil
	}
	h.closed = true
	var err error
	if h.writable {
		err = h.of.flush()
	}
	h.of.refs--
	if h.of.refs == 0 {
		if k := f.fileKey(h.of.path); !h.of.gone && f.files[k] == h.of {
			delete(f.files, k)
		}
		h.of.dropPages()
	}
	return err
}

// Flush stores the writes of every open file, then syncs: when it returns,
// everything written through any File survives a crash.
func (f *FS) Flush() error {
	f.lock()
	defer f.mu.Unlock()
	if err := f.flushOpen(); err != nil {
		return fmt.Errorf("flush: %w", err)
	}
	if err := f.sync(); err != nil {
		return fmt.Errorf("flush: %w", err)
	}
	return nil
}

// flushOpen stores every open file's writes.
func (f *FS) flushOpen() error {
	var errs []error
	for _, of := range f.files {
		if err := of.flush(); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// statLive is stat with the length of a file open for writing.
func (f *FS) statLive(p string) (FileInfo, error) {
	fi, err := f.stat(p)
	if err == nil && !fi.IsDir {
		if of := f.files[f.fileKey(p)]; of != nil {
			fi.Size = of.size
		}
	}
	return fi, err
}

// Truncate sets the length of the file p to n and stores it durably.
func (f *FS) Truncate(p string, n int64) error {
	h, err := f.OpenFile(p, os.O_RDWR)
	if err != nil {
		return err
	}
	err = h.Truncate(n)
	if cerr := h.Close(); err == nil {
		err = cerr
	}
	return err
}

// openUnlocked is a reader of p for use with fs.mu held (ext4's
// extentReader takes no lock; FAT's fatReader does, so it is not used).
func (f *FS) openUnlocked(p string) (io.ReaderAt, error) {
	if f.typ == Ext4 {
		r, err := f.open(p)
		if err != nil {
			return nil, err
		}
		return r.r, nil
	}
	fl, err := f.fs.OpenFile(p, os.O_RDONLY)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", display(p), err)
	}
	return &fatBase{f: fl}, nil
}
