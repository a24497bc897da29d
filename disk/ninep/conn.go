package ninep

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"path"
	"runtime/debug"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/hugelgupf/p9/linux"
	"github.com/hugelgupf/p9/p9"
)

// One client connection. The receiving goroutine only reads and decodes:
// every request but Tversion is served on a goroutine of its own, so that
// the kernel, which multiplexes every process over one connection, never
// sees one process's request wait behind another's (a read of a cold
// block of a network disk, an fsync). Serving a Tread on the receiver when
// nothing else was buffered was tried: besides that head-of-line wait it
// was slower (2,076-2,242 against 2,398-2,531 MB/s, three alternating
// pairs of BenchmarkBigFile), as the receiver then reads the next request
// only after the reply is out.

// maxInFlight bounds the requests a connection serves at once; the
// receiver waits for a free slot beyond it. Each slot holds up to two
// msize buffers, kept for the connection's life.
const maxInFlight = 16

// slot holds the buffers of one request in flight: the frame it arrived
// in (a Twrite's payload is read into it) and the reply built for it (an
// Rread's data is read into it), so that neither is allocated per request.
type slot struct {
	in  []byte
	out reply
}

type conn struct {
	s     *Server
	nc    net.Conn
	r     *bufio.Reader
	msize atomic.Uint32 // 0 until Tversion

	wmu sync.Mutex // one reply on the socket at a time

	mu   sync.Mutex
	fids map[uint32]*file
	tags map[uint16]chan struct{} // in flight; the channel, made by a Tflush, closes at the reply

	slots chan *slot
	made  int            // slots made (receiver only)
	wg    sync.WaitGroup // requests served off the receiver
}

// protoError is a frame the connection cannot continue after.
type protoError struct{ err error }

func (e protoError) Error() string { return e.err.Error() }

func newConn(s *Server, nc net.Conn) *conn {
	return &conn{s: s, nc: nc, r: bufio.NewReaderSize(nc, 64<<10),
		fids: map[uint32]*file{}, tags: map[uint16]chan struct{}{},
		slots: make(chan *slot, maxInFlight)}
}

func (c *conn) slot() *slot {
	select {
	case sl := <-c.slots:
		return sl
	default:
	}
	if c.made < maxInFlight {
		c.made++
		return &slot{}
	}
	return <-c.slots
}

// serve reads and answers requests until the client goes, the server
// closes the connection or the client breaks the framing; then it clunks
// every fid the client left (storing their writes).
func (c *conn) serve() {
	defer c.teardown()
	for {
		sl := c.slot()
		q, err := c.recv(sl)
		if err != nil {
			c.slots <- sl
			var pe protoError
			if errors.As(err, &pe) {
				c.s.log.Warn("9p client broke the protocol; connection closed", "err", err)
				return
			}
			if !errors.Is(err, io.EOF) && !errors.Is(err, net.ErrClosed) {
				c.s.log.Debug("9p connection read failed", "err", err)
			}
			return
		}
		if !c.startTag(q.tag) {
			c.s.log.Warn("9p client reused a tag in flight; connection closed", "tag", q.tag)
			c.slots <- sl
			return
		}
		if c.handOff(&q) {
			c.wg.Add(1)
			go func() {
				defer c.wg.Done()
				c.handle(sl, &q)
			}()
			continue
		}
		c.handle(sl, &q)
	}
}

// recv reads one frame into sl and decodes it. A body that does not
// decode is answered here (Rlerror EINVAL) and the next frame read; a
// frame that cannot be delimited (size below the header or beyond msize)
// is a protoError.
func (c *conn) recv(sl *slot) (request, error) {
	for {
		var hdr [hdrLen]byte
		if _, err := io.ReadFull(c.r, hdr[:]); err != nil {
			return request{}, err
		}
		size := binary.LittleEndian.Uint32(hdr[:])
		limit := c.msize.Load()
		if limit == 0 {
			limit = maxMsize
		}
		if size < hdrLen || size > limit {
			return request{}, protoError{fmt.Errorf("frame of %d bytes, outside %d..%d (the negotiated msize)", size, hdrLen, limit)}
		}
		n := int(size - hdrLen)
		if cap(sl.in) < n {
			sl.in = make([]byte, n, max(n, 4096))
		}
		body := sl.in[:n]
		if _, err := io.ReadFull(c.r, body); err != nil {
			return request{}, err
		}
		typ, tag := hdr[4], binary.LittleEndian.Uint16(hdr[5:])
		q, err := decodeRequest(typ, tag, body)
		if err == nil {
			return q, nil
		}
		c.s.log.Debug("9p request malformed", "type", typ, "err", err)
		if !c.startTag(tag) {
			return request{}, protoError{fmt.Errorf("malformed request reuses tag %d in flight", tag)}
		}
		c.send(tag, sl.out.rlerror(tag, uint32(linux.EINVAL)))
	}
}

// handOff says whether q is served on a goroutine of its own: all but
// Tversion, which sets the msize the next frames are read with.
func (c *conn) handOff(q *request) bool { return q.typ != msgTversion }

func (c *conn) handle(sl *slot, q *request) {
	out := c.dispatch(sl, q)
	sl.out = out[:0]
	c.send(q.tag, out)
	c.slots <- sl
}

// send writes the reply to tag whole and ends the tag. The tag ends first,
// under the send lock: the client may reuse it as soon as it reads the
// reply, and a Tflush waiting for it can send its Rflush only after this
// reply went out. A failed write closes the connection, which ends the
// receiver.
func (c *conn) send(tag uint16, b []byte) {
	c.wmu.Lock()
	c.endTag(tag)
	_, err := c.nc.Write(b)
	c.wmu.Unlock()
	if err != nil {
		c.nc.Close()
	}
}

func (c *conn) startTag(t uint16) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if _, ok := c.tags[t]; ok {
		return false
	}
	c.tags[t] = nil
	return true
}

func (c *conn) endTag(t uint16) {
	c.mu.Lock()
	ch := c.tags[t]
	delete(c.tags, t)
	c.mu.Unlock()
	if ch != nil {
		close(ch)
	}
}

// waitTag returns once the request with tag t, if one is in flight, has
// been answered.
func (c *conn) waitTag(t uint16) {
	c.mu.Lock()
	ch, ok := c.tags[t]
	if ok && ch == nil {
		ch = make(chan struct{})
		c.tags[t] = ch
	}
	c.mu.Unlock()
	if ok {
		<-ch
	}
}

func (c *conn) lookup(id uint32) *file {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.fids[id]
}

// insert binds id to f, replacing (and closing) what it held when replace.
func (c *conn) insert(id uint32, f *file, replace bool) error {
	c.mu.Lock()
	old, inUse := c.fids[id]
	if inUse && !replace {
		c.mu.Unlock()
		return linux.EBADF
	}
	c.fids[id] = f
	c.mu.Unlock()
	c.s.register(f)
	if inUse && old != f {
		c.s.unregister(old)
		old.Close()
	}
	return nil
}

// remove unbinds id and returns what it held.
func (c *conn) remove(id uint32) *file {
	c.mu.Lock()
	defer c.mu.Unlock()
	f := c.fids[id]
	delete(c.fids, id)
	return f
}

// teardown waits for the requests still being served, clunks every fid
// and closes the socket.
func (c *conn) teardown() {
	// the requests still running answer first: a client that half-closed
	// its side may still be reading
	c.wg.Wait()
	c.nc.Close()
	c.mu.Lock()
	fids := c.fids
	c.fids = map[uint32]*file{}
	c.mu.Unlock()
	for _, f := range fids {
		c.s.clunk(f)
	}
	// plaintext of the last reads and writes
	for i := 0; i < c.made; i++ {
		sl := <-c.slots
		clear(sl.in[:cap(sl.in)])
		clear(sl.out[:cap(sl.out)])
	}
}

// errno is the Rlerror code for err.
func errno(err error) uint32 { return uint32(linux.ExtractErrno(err)) }

// validName refuses names that are not one path element.
func validName(n string) bool {
	return n != "" && n != "." && n != ".." && !strings.Contains(n, "/")
}

// dispatch serves q and returns its reply, built in sl.out.
func (c *conn) dispatch(sl *slot, q *request) (out reply) {
	out = sl.out
	defer func() {
		if r := recover(); r != nil {
			c.s.log.Error("9p request panicked", "type", q.typ, "panic", fmt.Sprint(r), "stack", string(debug.Stack()))
			out = sl.out.rlerror(q.tag, uint32(linux.EIO))
		}
	}()
	fail := func(err error) reply { return out.rlerror(q.tag, errno(err)) }
	ok := func() reply { return out.start(q.typ+1, q.tag).finish() }
	if q.typ != msgTversion && c.msize.Load() == 0 {
		return fail(linux.EPROTO) // Tversion comes first
	}
	s := c.s
	switch q.typ {
	case msgTversion:
		return c.version(out, q)
	case msgTauth:
		return fail(linux.ENOSYS)
	case msgTattach:
		return c.attach(out, q)
	case msgTflush:
		if q.oldTag != q.tag {
			c.waitTag(q.oldTag)
		}
		return ok()
	case msgTwalk:
		return c.walk(out, q)
	case msgTread:
		return c.read(sl, q)
	case msgTwrite:
		f := c.lookup(q.fid)
		if f == nil {
			return fail(linux.EBADF)
		}
		s.tree.RLock()
		defer s.tree.RUnlock()
		f.mu.RLock()
		defer f.mu.RUnlock()
		switch {
		case !f.opened.Load():
			return fail(linux.EINVAL)
		case f.flags.Mode() == p9.ReadOnly:
			return fail(linux.EPERM)
		}
		n, err := f.WriteAt(q.data, int64(q.offset))
		if err != nil {
			return fail(err)
		}
		return out.start(msgTwrite+1, q.tag).u32(uint32(n)).finish()
	case msgTclunk:
		f := c.remove(q.fid)
		if f == nil {
			return fail(linux.EBADF)
		}
		if err := s.clunk(f); err != nil {
			return fail(err)
		}
		return ok()
	case msgTremove:
		return c.removeFile(out, q)
	case msgTlopen:
		f := c.lookup(q.fid)
		if f == nil {
			return fail(linux.EBADF)
		}
		s.tree.RLock()
		defer s.tree.RUnlock()
		f.mu.Lock()
		defer f.mu.Unlock()
		flags := p9.OpenFlags(q.flags)
		switch {
		case f.deleted, f.opened.Load():
			return fail(linux.EINVAL)
		case f.isDir && flags.Mode() != p9.ReadOnly:
			return fail(linux.EISDIR)
		}
		qid, iounit, err := f.Open(flags)
		if err != nil {
			return fail(err)
		}
		f.flags = flags
		f.opened.Store(true)
		return out.start(msgTlopen+1, q.tag).qid(qid).u32(iounit).finish()
	case msgTlcreate:
		return c.create(out, q)
	case msgTmkdir:
		if !validName(q.name) {
			return fail(linux.EINVAL)
		}
		f := c.lookup(q.fid)
		if f == nil {
			return fail(linux.EBADF)
		}
		s.tree.RLock()
		defer s.tree.RUnlock()
		if f.deleted || !f.isDir || f.opened.Load() {
			return fail(linux.EINVAL)
		}
		qid, err := f.Mkdir(q.name, 0o755, p9.NoUID, p9.NoGID)
		if err != nil {
			return fail(err)
		}
		return out.start(msgTmkdir+1, q.tag).qid(qid).finish()
	case msgTgetattr:
		f := c.lookup(q.fid)
		if f == nil {
			return fail(linux.EBADF)
		}
		s.tree.RLock()
		defer s.tree.RUnlock()
		f.mu.RLock()
		defer f.mu.RUnlock()
		qid, valid, attr, err := f.GetAttr(p9.AttrMaskAll)
		if err != nil {
			return fail(err)
		}
		return out.start(msgTgetattr+1, q.tag).attr(qid, valid, attr).finish()
	case msgTsetattr:
		f := c.lookup(q.fid)
		if f == nil {
			return fail(linux.EBADF)
		}
		s.tree.RLock()
		defer s.tree.RUnlock()
		f.mu.Lock()
		defer f.mu.Unlock()
		if f.deleted {
			return fail(linux.EINVAL)
		}
		if err := f.SetAttr(q.setMask, q.setAttr); err != nil {
			return fail(err)
		}
		return ok()
	case msgTreaddir:
		f := c.lookup(q.fid)
		if f == nil {
			return fail(linux.EBADF)
		}
		s.tree.RLock()
		defer s.tree.RUnlock()
		f.mu.RLock()
		defer f.mu.RUnlock()
		if f.deleted || !f.isDir || !f.opened.Load() {
			return fail(linux.EINVAL)
		}
		ents, err := f.Readdir(q.offset, q.count)
		if err != nil {
			return fail(err)
		}
		limit := min(int(q.count), int(c.msize.Load())-rreadHdr)
		return out.start(msgTreaddir+1, q.tag).dirents(ents, limit).finish()
	case msgTfsync:
		f := c.lookup(q.fid)
		if f == nil {
			return fail(linux.EBADF)
		}
		s.tree.RLock()
		defer s.tree.RUnlock()
		f.mu.RLock()
		defer f.mu.RUnlock()
		if !f.opened.Load() {
			return fail(linux.EINVAL)
		}
		if err := f.FSync(); err != nil {
			return fail(err)
		}
		return ok()
	case msgTstatfs:
		f := c.lookup(q.fid)
		if f == nil {
			return fail(linux.EBADF)
		}
		s.tree.RLock()
		defer s.tree.RUnlock()
		st, err := f.StatFS()
		if err != nil {
			return fail(err)
		}
		return out.start(msgTstatfs+1, q.tag).statfs(st).finish()
	case msgTunlinkat:
		if !validName(q.name) {
			return fail(linux.EINVAL)
		}
		f := c.lookup(q.fid)
		if f == nil {
			return fail(linux.EBADF)
		}
		s.tree.Lock()
		defer s.tree.Unlock()
		if f.deleted || !f.isDir || f.opened.Load() {
			return fail(linux.EINVAL)
		}
		if err := f.UnlinkAt(q.name, q.flags); err != nil {
			return fail(err)
		}
		s.markDeleted(f.child(q.name))
		return ok()
	case msgTrenameat:
		if !validName(q.name) || !validName(q.name2) {
			return fail(linux.EINVAL)
		}
		od, nd := c.lookup(q.fid), c.lookup(q.newFID)
		if od == nil || nd == nil {
			return fail(linux.EBADF)
		}
		s.tree.Lock()
		defer s.tree.Unlock()
		if od.deleted || !od.isDir || nd.deleted || !nd.isDir || od.opened.Load() {
			return fail(linux.EINVAL)
		}
		if err := s.rename(od, q.name, nd, q.name2); err != nil {
			return fail(err)
		}
		return ok()
	case msgTrename:
		if !validName(q.name) {
			return fail(linux.EINVAL)
		}
		f, nd := c.lookup(q.fid), c.lookup(q.newFID)
		if f == nil || nd == nil {
			return fail(linux.EBADF)
		}
		s.tree.Lock()
		defer s.tree.Unlock()
		if f.path == "/" || f.deleted || nd.deleted || !nd.isDir {
			return fail(linux.EINVAL)
		}
		parent := &file{s: s, path: path.Dir(f.path), isDir: true}
		if err := s.rename(parent, path.Base(f.path), nd, q.name); err != nil {
			return fail(err)
		}
		return ok()
	case msgTlock:
		f := c.lookup(q.fid)
		if f == nil {
			return fail(linux.EBADF)
		}
		s.tree.RLock()
		defer s.tree.RUnlock()
		l := q.lock
		st, err := f.Lock(int(l.pid), l.typ, p9.LockFlags(q.flags), l.start, l.length, l.client)
		if err != nil {
			return fail(err)
		}
		return out.start(msgTlock+1, q.tag).u8(uint8(st)).finish()
	case msgTgetlock:
		f := c.lookup(q.fid)
		if f == nil {
			return fail(linux.EBADF)
		}
		s.tree.RLock()
		defer s.tree.RUnlock()
		l := s.locks.test(f, q.lock)
		return out.start(msgTgetlock+1, q.tag).u8(uint8(l.typ)).u64(l.start).u64(l.length).
			u32(l.pid).str(l.client).finish()
	case msgTreadlink:
		if c.lookup(q.fid) == nil {
			return fail(linux.EBADF)
		}
		return fail(linux.EINVAL) // there are no symlinks
	case msgTxattrwalk, msgTxattrcreat:
		return fail(linux.EINVAL) // no extended attributes; tools read EINVAL as "none"
	}
	// Tsymlink, Tmknod, Tlink, the legacy 9P2000 messages and unknown types
	return fail(linux.ENOSYS)
}

func (c *conn) version(out reply, q *request) reply {
	v := "unknown"
	msize := min(q.msize, maxMsize)
	if q.name == "9P2000.L" || strings.HasPrefix(q.name, "9P2000.L.") {
		v = "9P2000.L"
	}
	if q.msize == 0 || v == "unknown" {
		return out.start(msgTversion+1, q.tag).u32(0).str("unknown").finish()
	}
	if msize < minMsize {
		return out.rlerror(q.tag, uint32(linux.EINVAL))
	}
	// A new version starts a new session: the old one's fids go.
	c.mu.Lock()
	fids := c.fids
	c.fids = map[uint32]*file{}
	c.mu.Unlock()
	for _, f := range fids {
		c.s.clunk(f)
	}
	c.msize.Store(msize)
	return out.start(msgTversion+1, q.tag).u32(msize).str(v).finish()
}

func (c *conn) attach(out reply, q *request) reply {
	if q.newFID != noFID { // an afid: there is no authentication
		return out.rlerror(q.tag, uint32(linux.EINVAL))
	}
	s := c.s
	s.tree.RLock()
	defer s.tree.RUnlock()
	root := &file{s: s, path: "/", isDir: true}
	qid, _, _, err := root.GetAttr(p9.AttrMaskAll)
	if err != nil {
		return out.rlerror(q.tag, errno(err))
	}
	f := root
	if names := split(q.name2); len(names) > 0 {
		if _, f, err = s.walk(root, names); err != nil {
			return out.rlerror(q.tag, errno(err))
		}
	}
	if err := c.insert(q.fid, f, false); err != nil {
		return out.rlerror(q.tag, errno(err))
	}
	return out.start(msgTattach+1, q.tag).qid(qid).finish()
}

func (c *conn) walk(out reply, q *request) reply {
	for _, n := range q.names {
		if !validName(n) {
			return out.rlerror(q.tag, uint32(linux.EINVAL))
		}
	}
	f := c.lookup(q.fid)
	if f == nil {
		return out.rlerror(q.tag, uint32(linux.EBADF))
	}
	s := c.s
	s.tree.RLock()
	defer s.tree.RUnlock()
	if q.fid == q.newFID && f.opened.Load() {
		return out.rlerror(q.tag, uint32(linux.EBUSY))
	}
	qids, nf, err := s.walk(f, q.names)
	if err != nil {
		return out.rlerror(q.tag, errno(err))
	}
	if err := c.insert(q.newFID, nf, q.newFID == q.fid); err != nil {
		return out.rlerror(q.tag, errno(err))
	}
	out = out.start(msgTwalk+1, q.tag).u16(uint16(len(qids)))
	for _, qid := range qids {
		out = out.qid(qid)
	}
	return out.finish()
}

// walk walks from f one name at a time. Unlike 9P2000's partial walk, a
// name that is not there fails the whole walk with its errno: that is
// what hugelgupf/p9's client (ninep.Dial, the tests) expects, and Linux
// treats a short Rwalk as ENOENT anyway. Walking zero names clones f.
func (s *Server) walk(f *file, names []string) ([]p9.QID, *file, error) {
	if len(names) == 0 {
		if _, err := s.fsys.Stat(f.path); err != nil {
			return nil, nil, s.errno("walk", f.path, err)
		}
		return nil, &file{s: s, path: f.path, isDir: f.isDir}, nil
	}
	qids := make([]p9.QID, 0, len(names))
	cur := f
	for _, n := range names {
		if !cur.isDir {
			return nil, nil, linux.EINVAL
		}
		if cur.deleted {
			return nil, nil, linux.ENOENT
		}
		q, next, err := cur.Walk([]string{n})
		if err != nil {
			return nil, nil, err
		}
		qids = append(qids, q...)
		cur = next.(*file)
	}
	return qids, cur, nil
}

func (c *conn) read(sl *slot, q *request) reply {
	out := sl.out
	if int64(q.count) > int64(c.msize.Load())-ioHdrLen {
		return out.rlerror(q.tag, uint32(linux.EINVAL))
	}
	f := c.lookup(q.fid)
	if f == nil {
		return out.rlerror(q.tag, uint32(linux.EBADF))
	}
	s := c.s
	s.tree.RLock()
	defer s.tree.RUnlock()
	f.mu.RLock()
	defer f.mu.RUnlock()
	switch {
	case !f.opened.Load():
		return out.rlerror(q.tag, uint32(linux.EINVAL))
	case f.flags.Mode() == p9.WriteOnly:
		return out.rlerror(q.tag, uint32(linux.EPERM))
	}
	need := rreadHdr + int(q.count)
	if cap(out) < need {
		out = make(reply, 0, max(need, 4096))
	}
	out = out[:need]
	// the data is read straight into the reply: no copy, and only the n
	// bytes read are sent (nothing to zero)
	n, err := f.ReadAt(out[rreadHdr:], int64(q.offset))
	if err != nil {
		return out.rlerror(q.tag, errno(err))
	}
	out = out[:rreadHdr+n]
	binary.LittleEndian.PutUint32(out, uint32(len(out)))
	out[4] = msgTread + 1
	binary.LittleEndian.PutUint16(out[5:], q.tag)
	binary.LittleEndian.PutUint32(out[hdrLen:], uint32(n))
	return out
}

func (c *conn) create(out reply, q *request) reply {
	if !validName(q.name) {
		return out.rlerror(q.tag, uint32(linux.EINVAL))
	}
	f := c.lookup(q.fid)
	if f == nil {
		return out.rlerror(q.tag, uint32(linux.EBADF))
	}
	s := c.s
	s.tree.RLock()
	defer s.tree.RUnlock()
	f.mu.Lock()
	if f.deleted || !f.isDir || f.opened.Load() {
		f.mu.Unlock()
		return out.rlerror(q.tag, uint32(linux.EINVAL))
	}
	flags := p9.OpenFlags(q.flags)
	pf, qid, iounit, err := f.Create(q.name, flags, 0o644, p9.NoUID, p9.NoGID)
	f.mu.Unlock()
	if err != nil {
		return out.rlerror(q.tag, errno(err))
	}
	nf := pf.(*file)
	nf.flags = flags
	nf.opened.Store(true)
	// the fid now stands for the new file (the directory's is closed)
	c.insert(q.fid, nf, true)
	return out.start(msgTlcreate+1, q.tag).qid(qid).u32(iounit).finish()
}

// removeFile serves Tremove: unlink the fid's file and clunk the fid,
// even when the unlink fails.
func (c *conn) removeFile(out reply, q *request) reply {
	f := c.remove(q.fid)
	if f == nil {
		return out.rlerror(q.tag, uint32(linux.EBADF))
	}
	s := c.s
	err := func() error {
		s.tree.Lock()
		defer s.tree.Unlock()
		if f.path == "/" || f.deleted {
			return linux.EINVAL
		}
		parent := &file{s: s, path: path.Dir(f.path), isDir: true}
		if err := parent.UnlinkAt(path.Base(f.path), 0); err != nil {
			return err
		}
		s.markDeleted(f.path)
		return nil
	}()
	if cerr := s.clunk(f); cerr != nil {
		return out.rlerror(q.tag, errno(cerr))
	}
	if err != nil {
		return out.rlerror(q.tag, errno(err))
	}
	return out.start(msgTremove+1, q.tag).finish()
}
