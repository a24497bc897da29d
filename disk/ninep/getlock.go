package ninep

import (
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"sync"

	"github.com/hugelgupf/p9/p9"
)

// Tgetlock (F_GETLK) on the wire. hugelgupf/p9 v0.3.0 does not decode it,
// and answers the unknown message with an error, which Linux's v9fs turns
// into EIO for the fcntl: SQLite then fails to open a database's WAL
// index. So each connection passes through a translator: a Tgetlock is
// rewritten into a Tlock with probeFlag set, which file.Lock answers by
// testing for a conflict without taking a lock, and the Rlock that comes
// back is rewritten into the Rgetlock the client asked for.

const (
	msgRlerror  = 7
	msgTlock    = 52
	msgRlock    = 53
	msgTgetlock = 54
	msgRgetlock = 55
	hdrLen      = 7 // size[4] type[1] tag[2]

	// probeFlag marks a Tlock that stands for a Tgetlock. Linux sends only
	// P9_LOCK_FLAGS_BLOCK (1) and RECLAIM (2).
	probeFlag p9.LockFlags = 1 << 31

	// maxGetlock bounds a Tgetlock: fixed fields and a client id (a node
	// name, 64 bytes on Linux).
	maxGetlock = 4096
)

// getlockReq is a Tgetlock in flight, by tag.
type getlockReq struct {
	typ           p9.LockType
	start, length uint64
	pid           uint32
	client        string
}

type translator struct {
	s  *Server
	mu sync.Mutex
	// pending Tgetlocks by tag, from their rewrite to their reply
	pending map[uint16]getlockReq
}

// translate returns the reader and writer p9 serves c through.
func (s *Server) translate(c net.Conn) (io.ReadCloser, io.WriteCloser) {
	t := &translator{s: s, pending: map[uint16]getlockReq{}}
	return &tReader{t: t, c: c}, &tWriter{t: t, c: c}
}

// tReader passes requests through, rewriting each Tgetlock into a Tlock.
type tReader struct {
	t    *translator
	c    net.Conn
	out  []byte // bytes of a rewritten or held frame, still to deliver
	body int    // bytes of the current frame's body to pass straight through
}

func (r *tReader) Read(p []byte) (int, error) {
	switch {
	case len(r.out) > 0:
		n := copy(p, r.out)
		r.out = r.out[n:]
		return n, nil
	case r.body > 0:
		n, err := r.c.Read(p[:min(len(p), r.body)])
		r.body -= n
		return n, err
	}
	var hdr [hdrLen]byte
	if _, err := io.ReadFull(r.c, hdr[:]); err != nil {
		return 0, err
	}
	size := binary.LittleEndian.Uint32(hdr[:])
	if hdr[4] != msgTgetlock || size < hdrLen || size > maxGetlock {
		r.out, r.body = append(r.out[:0], hdr[:]...), int(max(size, hdrLen)-hdrLen)
		return r.Read(p)
	}
	body := make([]byte, size-hdrLen)
	if _, err := io.ReadFull(r.c, body); err != nil {
		return 0, err
	}
	tag := binary.LittleEndian.Uint16(hdr[5:])
	tlock, req, err := getlockToLock(tag, body)
	if err != nil {
		// Malformed: let p9 see (and refuse) the original.
		r.out = append(hdr[:], body...)
		return r.Read(p)
	}
	r.t.mu.Lock()
	r.t.pending[tag] = req
	r.t.mu.Unlock()
	r.out = tlock
	return r.Read(p)
}

func (r *tReader) Close() error { return r.c.Close() }

// getlockToLock rewrites the body of Tgetlock (fid[4] type[1] start[8]
// length[8] proc_id[4] client_id[s]) as a whole Tlock frame (fid[4]
// type[1] flags[4] start[8] length[8] proc_id[4] client_id[s]).
func getlockToLock(tag uint16, b []byte) ([]byte, getlockReq, error) {
	le := binary.LittleEndian
	if len(b) < 27 {
		return nil, getlockReq{}, fmt.Errorf("getlock request of %d bytes", len(b))
	}
	n := int(le.Uint16(b[25:]))
	if len(b) != 27+n {
		return nil, getlockReq{}, fmt.Errorf("getlock client id of %d bytes in %d", n, len(b))
	}
	req := getlockReq{typ: p9.LockType(b[4]), start: le.Uint64(b[5:]), length: le.Uint64(b[13:]),
		pid: le.Uint32(b[21:]), client: string(b[27:])}
	out := make([]byte, hdrLen, hdrLen+len(b)+4)
	le.PutUint32(out, uint32(hdrLen+len(b)+4))
	out[4] = msgTlock
	le.PutUint16(out[5:], tag)
	out = append(out, b[:5]...) // fid, type
	out = le.AppendUint32(out, uint32(probeFlag))
	out = append(out, b[5:]...) // start, length, proc_id, client_id
	return out, req, nil
}

// tWriter passes replies through, rewriting the Rlock of a probe into an
// Rgetlock. p9 sends each reply under its connection's send lock, as a few
// Writes (header, fields, payload); a frame is held (by reference) until
// complete and then written with one writev, as p9 itself would.
type tWriter struct {
	t     *translator
	c     net.Conn
	frame net.Buffers
	have  int
	size  int // of the current frame, once its header is in
}

func (w *tWriter) Write(p []byte) (int, error) {
	n := len(p)
	for len(p) > 0 {
		if w.size == 0 && w.have+len(p) >= hdrLen {
			var hdr [hdrLen]byte
			got := 0
			for _, b := range w.frame {
				got += copy(hdr[got:], b)
			}
			copy(hdr[got:], p)
			w.size = int(binary.LittleEndian.Uint32(hdr[:]))
			if w.size < hdrLen {
				return 0, fmt.Errorf("9p reply of %d bytes", w.size)
			}
		}
		take := len(p)
		if w.size > 0 {
			take = min(take, w.size-w.have)
		}
		w.frame = append(w.frame, p[:take])
		w.have += take
		p = p[take:]
		if w.size > 0 && w.have == w.size {
			err := w.flush()
			w.frame, w.have, w.size = w.frame[:0], 0, 0
			if err != nil {
				return 0, err
			}
		}
	}
	return n, nil
}

func (w *tWriter) flush() error {
	var hdr [hdrLen]byte
	got := 0
	for _, b := range w.frame {
		if got < hdrLen {
			got += copy(hdr[got:], b)
		}
	}
	typ, tag := hdr[4], binary.LittleEndian.Uint16(hdr[5:])
	if typ == msgRlock || typ == msgRlerror {
		w.t.mu.Lock()
		req, ok := w.t.pending[tag]
		delete(w.t.pending, tag)
		w.t.mu.Unlock()
		if ok && typ == msgRlock {
			var whole []byte
			for _, b := range w.frame {
				whole = append(whole, b...)
			}
			_, err := w.c.Write(w.t.getlockReply(tag, req, p9.LockStatus(whole[hdrLen])))
			return err
		}
	}
	_, err := w.frame.WriteTo(w.c)
	return err
}

func (w *tWriter) Close() error { return w.c.Close() }

// getlockReply builds the Rgetlock for a probe's status: the lock that
// conflicts, or the request itself with type unlocked when none does.
func (t *translator) getlockReply(tag uint16, req getlockReq, status p9.LockStatus) []byte {
	le := binary.LittleEndian
	typ, start, length, pid, client := p9.Unlock, req.start, req.length, req.pid, req.client
	if status != p9.LockStatusOK {
		if c, ok := t.s.locks.takeConflict(req); ok {
			typ, start, pid, client = p9.ReadLock, c.start, uint32(c.owner.pid), c.owner.client
			if c.write {
				typ = p9.WriteLock
			}
			length = 0
			if c.end != 0 {
				length = c.end - c.start
			}
		} else {
			typ = req.typ // a conflict we cannot name: say only that there is one
		}
	}
	out := make([]byte, hdrLen, hdrLen+23+len(client))
	out[4] = msgRgetlock
	le.PutUint16(out[5:], tag)
	out = append(out, byte(typ))
	out = le.AppendUint64(out, start)
	out = le.AppendUint64(out, length)
	out = le.AppendUint32(out, pid)
	out = le.AppendUint16(out, uint16(len(client)))
	out = append(out, client...)
	le.PutUint32(out, uint32(len(out)))
	return out
}
