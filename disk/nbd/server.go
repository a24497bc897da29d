package nbd

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"runtime"
	"sync"
	"time"

	"github.com/keygate/keygate/internal/unixsock"
)

// Backend is the block device an export serves: the plaintext view of an
// encrypted volume (disk.Blocks) or, as a performance reference, a file.
// Its methods are called concurrently.
type Backend interface {
	io.ReaderAt
	// WriteAt returns once all of p is in the backing store.
	io.WriterAt
	// Sync makes every completed write durable.
	Sync() error
	Size() int64
}

// Defaults of Options.
const (
	DefaultMaxRequest  = 32 << 20
	DefaultMaxInFlight = 16
	DefaultMaxConns    = 16
	handshakeTimeout   = 10 * time.Second
	// readBuffer is each connection's request buffer: 64 KiB holds the
	// headers of a full queue and a few 4 KiB payloads.
	readBuffer = 64 << 10
)

// Options configures a Server. The zero value serves a writable export
// named "" with 512-byte blocks.
type Options struct {
	// Name is the export's name; "" is always accepted too.
	Name     string
	ReadOnly bool
	// MinBlock and PreferredBlock are advertised to clients that ask
	// (NBD_INFO_BLOCK_SIZE): the volume's sector size. Smaller or
	// unaligned requests still work, through read-modify-write.
	MinBlock, PreferredBlock uint32
	// MaxRequest bounds a request's length (DefaultMaxRequest).
	MaxRequest uint32
	// MaxInFlight bounds the requests one connection has under way
	// (DefaultMaxInFlight); with MaxRequest and MaxConns (DefaultMaxConns)
	// it bounds the memory clients can make the server hold.
	MaxInFlight int
	MaxConns    int
	Log         *slog.Logger
}

// Server serves one Backend as an NBD export (fixed newstyle handshake,
// simple replies) on any number of connections at once: the export
// advertises NBD_FLAG_CAN_MULTI_CONN, which holds because a FLUSH syncs the
// whole backend, not one connection's writes.
type Server struct {
	b     Backend
	size  int64
	flags uint16
	opts  Options
	log   *slog.Logger

	mu    sync.Mutex
	lns   map[net.Listener]struct{}
	conns map[net.Conn]struct{}
	done  bool
	wg    sync.WaitGroup
}

// NewServer returns a server for b.
func NewServer(b Backend, o Options) *Server {
	if o.MinBlock == 0 {
		o.MinBlock = 512
	}
	if o.PreferredBlock < o.MinBlock {
		o.PreferredBlock = max(o.MinBlock, 4096)
	}
	if o.MaxRequest == 0 {
		o.MaxRequest = DefaultMaxRequest
	}
	if o.MaxInFlight <= 0 {
		o.MaxInFlight = DefaultMaxInFlight
	}
	if o.MaxConns <= 0 {
		o.MaxConns = DefaultMaxConns
	}
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	flags := uint16(FlagHasFlags | FlagSendFlush | FlagSendFUA | FlagSendWriteZeros | FlagCanMultiConn)
	if o.ReadOnly {
		flags |= FlagReadOnly
	}
	return &Server{b: b, size: b.Size(), flags: flags, opts: o, log: o.Log,
		lns: map[net.Listener]struct{}{}, conns: map[net.Conn]struct{}{}}
}

// Flags are the transmission flags the export advertises; an in-kernel
// client set up without a handshake (NBD_SET_FLAGS) needs them.
func (s *Server) Flags() uint16 { return s.flags }

// Size is the export's size in bytes.
func (s *Server) Size() int64 { return s.size }

// ErrServerClosed is what Serve returns after Close.
var ErrServerClosed = errors.New("nbd: server closed")

// Serve accepts connections on l, each served with a handshake, until l
// fails or Close is called.
func (s *Server) Serve(l net.Listener) error {
	if !add(s, s.lns, l) {
		l.Close()
		return ErrServerClosed
	}
	defer remove(s, s.lns, l)
	var backoff unixsock.AcceptBackoff
	for {
		c, err := l.Accept()
		if err != nil {
			if s.closing() {
				return ErrServerClosed
			}
			if in, ok := backoff.Wait(err); ok {
				s.log.Warn("nbd accept failed; retried", "err", err, "after", in)
				continue
			}
			return fmt.Errorf("nbd: accept: %w", err)
		}
		backoff.Reset()
		if s.connCount() >= s.opts.MaxConns {
			s.log.Warn("nbd: connection refused: too many", "max", s.opts.MaxConns)
			c.Close()
			continue
		}
		go s.ServeConn(c)
	}
}

// ServeConn runs the handshake on c, then serves requests until the client
// disconnects, a protocol error, or Close. It closes c.
func (s *Server) ServeConn(c net.Conn) error {
	return s.serve(c, true, nil)
}

// ServeTransmission serves requests on c with no handshake: for the Linux
// kernel's NBD client, which is given its socket already negotiated. It
// closes c.
func (s *Server) ServeTransmission(c net.Conn) error {
	return s.serve(c, false, nil)
}

// serve runs one connection. threadInit, when set, is run on each OS
// thread that serves it (the reader and a fixed set of workers, each
// locked to its thread), for thread attributes such as PR_SET_IO_FLUSHER.
func (s *Server) serve(c net.Conn, handshake bool, threadInit func() error) error {
	s.wg.Add(1)
	defer s.wg.Done()
	if !add(s, s.conns, c) {
		c.Close()
		return ErrServerClosed
	}
	defer remove(s, s.conns, c)
	defer c.Close()
	if handshake {
		c.SetDeadline(time.Now().Add(handshakeTimeout))
		if err := s.handshake(c); err != nil {
			if !errors.Is(err, errAbort) {
				s.log.Warn("nbd handshake failed; connection closed", "err", err)
			}
			return err
		}
		c.SetDeadline(time.Time{})
	}
	err := s.transmit(c, threadInit)
	if err != nil && !s.closing() {
		s.log.Warn("nbd connection closed", "err", err)
	}
	return err
}

// Close stops every listener and connection and waits until no request is
// under way, so that the backend can then be closed safely.
func (s *Server) Close() error {
	s.mu.Lock()
	s.done = true
	for l := range s.lns {
		l.Close()
	}
	for c := range s.conns {
		c.Close()
	}
	s.mu.Unlock()
	s.wg.Wait()
	return nil
}

func (s *Server) connCount() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.conns)
}

func (s *Server) closing() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.done
}

// add registers v in m unless the server is closing.
func add[T comparable](s *Server, m map[T]struct{}, v T) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.done {
		return false
	}
	m[v] = struct{}{}
	return true
}

func remove[T comparable](s *Server, m map[T]struct{}, v T) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(m, v)
}

// conn is one connection's transmission phase: a reader that parses
// requests in order and a bounded set of handlers that answer them in any
// order, each reply written whole under wmu.
type conn struct {
	s    *Server
	c    net.Conn
	wmu  sync.Mutex
	werr error
	// hdr, iov and out are the reply being sent, under wmu.
	hdr   [replyHdrSize]byte
	iov   [2][]byte
	out   net.Buffers
	slots chan struct{}
	wg    sync.WaitGroup
}

func (s *Server) transmit(c net.Conn, threadInit func() error) error {
	cn := &conn{s: s, c: c, slots: make(chan struct{}, s.opts.MaxInFlight)}
	// Handlers still under way finish (their writes are in the backend)
	// before the connection is closed and before Close returns.
	defer cn.wg.Wait()
	dispatch := func(r Request, payload *[]byte) {
		go func() {
			defer func() { <-cn.slots; cn.wg.Done() }()
			cn.handle(r, payload)
		}()
	}
	if threadInit != nil {
		runtime.LockOSThread() // the thread ends with this goroutine
		if err := threadInit(); err != nil {
			s.log.Warn("nbd: serving without the thread attribute", "err", err)
		}
		work := make(chan func(), s.opts.MaxInFlight)
		// The workers are gone when transmit returns (closing work ends
		// them once they drain it; deferred calls run last first): no
		// serving thread outlives its connection, and each has run
		// threadInit by then, even one the runtime started late.
		var workers sync.WaitGroup
		defer workers.Wait()
		defer close(work)
		for range s.opts.MaxInFlight {
			workers.Add(1)
			go func() {
				defer workers.Done()
				runtime.LockOSThread()
				if err := threadInit(); err != nil {
					s.log.Warn("nbd: serving without the thread attribute", "err", err)
				}
				for fn := range work {
					fn()
				}
			}()
		}
		dispatch = func(r Request, payload *[]byte) {
			work <- func() {
				defer func() { <-cn.slots; cn.wg.Done() }()
				cn.handle(r, payload)
			}
		}
	}
	// A request alone on a kernel socket (blockingConn: none under way,
	// none waiting in the buffer), of any size and type, is served on the
	// reader's thread, which then blocks in read(2) again: no goroutine,
	// no wakeup of another thread. Handed to a handler it would wait for
	// one: the reader's thread is in read(2), so the runtime must wake
	// another (a 1 MiB read-ahead or writeback, and a FLUSH after each
	// fsync, paid this). What the kernel sends meanwhile waits in the
	// socket until the reply is out; when the reader then finds several
	// requests waiting, they go to handlers, so that a queue still
	// overlaps the disk with the cipher.
	_, inline := c.(vectorWriter)
	// Requests are read through a buffer: a client with several requests
	// under way (the kernel's queue, nbdcopy, fio at depth 16) has their
	// headers, and small writes' payloads, waiting together on the socket,
	// and one read takes them all instead of two reads per request. Large
	// payloads go straight into their own buffer (bufio reads directly
	// into a destination larger than its own). The handshake reads c
	// unbuffered, so no request sent right after it is lost.
	rd := bufio.NewReaderSize(c, readBuffer)
	hdr := make([]byte, requestHdrSize)
	for {
		if _, err := io.ReadFull(rd, hdr); err != nil {
			if errors.Is(err, io.EOF) {
				return nil // a client that closes without NBD_CMD_DISC
			}
			return fmt.Errorf("read request: %w", err)
		}
		r, err := ParseRequest(hdr)
		if err != nil {
			return err
		}
		if r.Type == CmdDisc {
			return nil
		}
		var payload *[]byte
		if r.Type == CmdWrite && r.Length > s.opts.MaxRequest {
			// The payload cannot be skipped safely: close.
			return fmt.Errorf("WRITE of %d bytes, more than the %d advertised", r.Length, s.opts.MaxRequest)
		}
		// The slot first, then the payload's buffer: a connection holds
		// at most MaxInFlight requests' buffers.
		cn.slots <- struct{}{}
		if r.Type == CmdWrite {
			payload = getBuf(int(r.Length))
			if _, err := io.ReadFull(rd, *payload); err != nil {
				putBuf(payload)
				<-cn.slots
				// Nothing of a request cut short is written.
				return fmt.Errorf("read WRITE payload of %d bytes: %w", r.Length, err)
			}
		}
		if inline && len(cn.slots) == 1 && rd.Buffered() == 0 {
			cn.handle(r, payload)
			<-cn.slots
		} else {
			cn.wg.Add(1)
			dispatch(r, payload)
		}
		if err := cn.writeErr(); err != nil {
			return err
		}
	}
}

// vectorWriter is a connection that sends several buffers in one system
// call without the network poller: a kernel socket (blockingConn).
type vectorWriter interface {
	writev(bufs [][]byte) (int, error)
}

func (cn *conn) writeErr() error {
	cn.wmu.Lock()
	defer cn.wmu.Unlock()
	return cn.werr
}

// handle runs one request and sends its reply.
func (cn *conn) handle(r Request, payload *[]byte) {
	if payload != nil {
		defer putBuf(payload)
	}
	if errno := cn.check(r); errno != 0 {
		cn.reply(r.Cookie, errno, nil)
		return
	}
	s := cn.s
	switch r.Type {
	case CmdRead:
		bp := getBuf(int(r.Length))
		defer putBuf(bp)
		buf := *bp
		if _, err := s.b.ReadAt(buf, int64(r.Offset)); err != nil {
			s.log.Error("nbd READ failed", "offset", r.Offset, "length", r.Length, "err", err)
			cn.reply(r.Cookie, errIO, nil)
			return
		}
		cn.reply(r.Cookie, 0, buf)
	case CmdWrite:
		if _, err := s.b.WriteAt(*payload, int64(r.Offset)); err != nil {
			s.log.Error("nbd WRITE failed", "offset", r.Offset, "length", r.Length, "err", err)
			cn.reply(r.Cookie, errIO, nil)
			return
		}
		cn.reply(r.Cookie, cn.fua(r), nil)
	case CmdWriteZeroes:
		if err := writeZeroes(s.b, int64(r.Offset), int64(r.Length)); err != nil {
			s.log.Error("nbd WRITE_ZEROES failed", "offset", r.Offset, "length", r.Length, "err", err)
			cn.reply(r.Cookie, errIO, nil)
			return
		}
		cn.reply(r.Cookie, cn.fua(r), nil)
	case CmdFlush:
		cn.reply(r.Cookie, cn.sync(), nil)
	}
}

// fua syncs after a write that asked for it (NBD_CMD_FLAG_FUA).
func (cn *conn) fua(r Request) uint32 {
	if r.Flags&CmdFlagFUA == 0 {
		return 0
	}
	return cn.sync()
}

func (cn *conn) sync() uint32 {
	if err := cn.s.b.Sync(); err != nil {
		cn.s.log.Error("nbd FLUSH failed: writes may not be durable", "err", err)
		return errIO
	}
	return 0
}

// check validates a request against the export and returns the errno to
// answer with, or 0.
func (cn *conn) check(r Request) uint32 {
	s := cn.s
	var allowed uint16
	switch r.Type {
	case CmdRead:
		allowed = CmdFlagFUA // meaningless on a read, and harmless
	case CmdWrite:
		allowed = CmdFlagFUA
	case CmdWriteZeroes:
		allowed = CmdFlagFUA | CmdFlagNoHole
	case CmdFlush:
		if r.Offset != 0 || r.Length != 0 {
			return errInval
		}
		return 0
	default:
		// TRIM, CACHE and BLOCK_STATUS are not advertised.
		return errInval
	}
	if r.Flags&^allowed != 0 {
		return errInval
	}
	if r.Type != CmdRead && s.opts.ReadOnly {
		return errPerm
	}
	if r.Length == 0 || r.Length > s.opts.MaxRequest && r.Type != CmdWriteZeroes {
		return errInval
	}
	if r.Offset > uint64(s.size) || uint64(r.Length) > uint64(s.size)-r.Offset {
		if r.Type == CmdRead {
			return errInval
		}
		return errNoSpc
	}
	return 0
}

// reply sends one simple reply, with data for a successful read.
func (cn *conn) reply(cookie uint64, errno uint32, data []byte) {
	cn.wmu.Lock()
	defer cn.wmu.Unlock()
	if cn.werr != nil {
		return
	}
	// The header and the data go out in one writev, from buffers of the
	// connection's own: a reply allocates nothing.
	putReply(cn.hdr[:], errno, cookie)
	cn.iov[0], cn.iov[1] = cn.hdr[:], nil
	cn.out = cn.iov[:1]
	if errno == 0 && data != nil {
		cn.iov[1] = data
		cn.out = cn.iov[:2]
	}
	var err error
	if vw, ok := cn.c.(vectorWriter); ok {
		_, err = vw.writev(cn.out)
	} else {
		_, err = cn.out.WriteTo(cn.c)
	}
	cn.iov[1] = nil // the data's buffer goes back to its pool
	if err != nil {
		cn.werr = fmt.Errorf("send reply: %w", err)
		cn.c.Close() // wakes the reader
	}
}

// writeZeroes writes real zeros: on an encrypted backend a hole punched in
// the image would read back as noise, and would tell the storage provider
// which blocks are unused.
func writeZeroes(b Backend, off, n int64) error {
	zero := make([]byte, min(n, 1<<20))
	for n > 0 {
		m := min(n, int64(len(zero)))
		if _, err := b.WriteAt(zero[:m], off); err != nil {
			return err
		}
		off, n = off+m, n-m
	}
	return nil
}

// Request buffers are pooled by power-of-two size class from 4 KiB, so a
// stream of same-sized requests allocates nothing.
var bufPools [14]sync.Pool // 4 KiB .. 32 MiB

func sizeClass(n int) int {
	c := 0
	for size := 4096; size < n; size <<= 1 {
		c++
	}
	return c
}

// getBuf returns a buffer of n bytes; it is pooled by pointer, so that
// putting it back allocates nothing either.
func getBuf(n int) *[]byte {
	c := sizeClass(n)
	if c >= len(bufPools) {
		b := make([]byte, n)
		return &b
	}
	if p, ok := bufPools[c].Get().(*[]byte); ok {
		*p = (*p)[:n]
		return p
	}
	b := make([]byte, n, 4096<<c)
	return &b
}

func putBuf(p *[]byte) {
	c := sizeClass(cap(*p))
	if c >= len(bufPools) || cap(*p) != 4096<<c {
		return
	}
	bufPools[c].Put(p)
}
