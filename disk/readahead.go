package disk

// Sequential readahead for File.ReadAt. A file server answers one read
// at a time per reader (a kernel 9P mount has one Tread in flight), so a
// read that decrypts synchronously leaves the CPU idle while the reply
// travels, and the transport idle while the next chunk decrypts. When a
// handle reads sequentially, ReadAt starts the next chunk's read (and
// decryption) on a goroutine before it returns, so that it overlaps the
// sending of this one; the next ReadAt takes it if nothing changed the
// file meanwhile.
//
// What may be served from a readahead: only a chunk read at the file's
// current generation (openFile.gen, bumped by every write, truncation,
// reopen or detach, all under fs.mu), at exactly the offset asked. A
// write that lands after the chunk was read bumps the generation, and the
// next ReadAt reads again rather than serve what the write replaced.
//
// Memory: one chunk of at most maxReadAhead bytes per handle, wiped when
// it is consumed or discarded and when the handle closes. It holds file
// plaintext (never key material) a little before the reader asks for it;
// docs/threat-model.md says so.

import "io"

// maxReadAhead bounds one handle's readahead: a kernel 9P mount's reads
// are msize (512 KiB by default) at most.
const maxReadAhead = 1 << 20

// minReadAhead is the smallest sequential read that starts a readahead:
// a smaller reader (a database's pages) gains little from it and would
// pay a goroutine per read.
const minReadAhead = 64 << 10

// readAhead is one chunk read ahead on a goroutine. Its fields are
// written by the goroutine before done is closed, and read after.
type readAhead struct {
	off  int64
	buf  []byte
	n    int
	err  error
	gen  uint64 // the openFile's generation the chunk was read at
	read bool   // false: the handle closed or the file ended first
	done chan struct{}
}

// startReadAhead reads len(buf) bytes at off on a goroutine, for h's next
// ReadAt. fs.mu is held; the goroutine takes it once the caller drops it.
func (h *File) startReadAhead(off int64, size int) {
	buf := h.raBuf
	h.raBuf = nil
	if cap(buf) < size {
		buf = make([]byte, size)
	}
	ra := &readAhead{off: off, buf: buf[:size], done: make(chan struct{})}
	h.ra = ra
	of := h.of
	go func() {
		defer close(ra.done)
		of.fs.mu.Lock()
		defer of.fs.mu.Unlock()
		if h.closed || off >= of.size {
			return
		}
		ra.gen, ra.read = of.gen, true
		ra.n, ra.err = of.readAt(ra.buf, off)
	}()
}

// takeReadAhead detaches h's readahead, if any, and waits for it to end.
// It must be called without fs.mu, which the readahead's goroutine takes.
func (h *File) takeReadAhead() *readAhead {
	mu := &h.of.fs.mu
	mu.Lock()
	ra := h.ra
	h.ra = nil
	mu.Unlock()
	if ra != nil {
		<-ra.done
	}
	return ra
}

// ahead decides what follows ReadAt(p, off) that read n bytes with err,
// ra being the readahead it took (served from it if served): a reader
// going on sequentially by reads of at least minReadAhead gets the next
// chunk read ahead once ra cannot hold its next read; what ra still
// holds stays for the next read. fs.mu is held.
func (h *File) ahead(ra *readAhead, served bool, off int64, size, n int, err error) {
	seq := off == h.next
	h.next = off + int64(n)
	switch {
	case h.ra != nil: // a concurrent ReadAt started one meanwhile
		h.recycle(ra)
	case seq && err == nil && size >= minReadAhead && h.next < h.of.size && !(served && ra.holds(h.next, size)):
		h.recycle(ra)
		h.startReadAhead(h.next, min((size+pageSize-1)/pageSize*pageSize, maxReadAhead))
	case served:
		h.ra = ra
	default:
		h.recycle(ra)
	}
}

// holds reports whether ra holds all of a read of size bytes at off that
// the file can give.
func (ra *readAhead) holds(off int64, size int) bool {
	end := ra.off + int64(ra.n)
	return off >= ra.off && (off+int64(size) <= end || ra.err == io.EOF && off <= end)
}

// serve copies the readahead into p if it holds what ReadAt(p, off) would
// read now: read at the file's current generation, without error (the
// end of the file aside), and holding all of what the read can get.
// fs.mu is held.
func (ra *readAhead) serve(of *openFile, p []byte, off int64) (n int, err error, ok bool) {
	if ra == nil || !ra.read || ra.gen != of.gen || !ra.holds(off, len(p)) {
		return 0, nil, false
	}
	if ra.err != nil && ra.err != io.EOF {
		return 0, nil, false // read again, and report what is wrong now
	}
	n = copy(p, ra.buf[off-ra.off:ra.n])
	of.fs.readAheads++
	if n < len(p) {
		return n, io.EOF, true
	}
	return n, nil, true
}

// recycle wipes the readahead's chunk and keeps it for h's next one.
// fs.mu is held.
func (h *File) recycle(ra *readAhead) {
	if ra == nil {
		return
	}
	clear(ra.buf)
	if h.raBuf == nil && !h.closed {
		h.raBuf = ra.buf
	}
}
