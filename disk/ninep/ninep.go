// Package ninep exports an unlocked disk.FS as a 9P2000.L file server on
// a stream socket (a unix socket for `mount -t 9p -o trans=unix`). It owns
// the mapping from 9P operations and errnos onto disk.FS; it does not own
// the filesystem, the volume keys or the socket's lifetime policy.
package ninep

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"

	"github.com/hugelgupf/p9/p9"

	"github.com/keygate/keygate/disk"
	"github.com/keygate/keygate/internal/unixsock"
)

// Server serves one disk.FS over 9P2000.L.
type Server struct {
	fsys     *disk.FS
	log      *slog.Logger
	readOnly bool
	p9       *p9.Server
	locks    lockTable

	mu       sync.Mutex
	closed   bool
	lns      map[net.Listener]struct{}
	conns    map[net.Conn]struct{}
	wg       sync.WaitGroup
	closeErr []error // flushes that failed while Close clunked the fids
}

// clunked records a failed flush of a fid closed by Close, which p9
// discards, so that Close can report it.
func (s *Server) clunked(p string, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		s.closeErr = append(s.closeErr, fmt.Errorf("store %s: %w", p, err))
	}
}

// Option configures a Server.
type Option func(*Server)

// WithLogger sets the logger for connection and error events.
func WithLogger(l *slog.Logger) Option { return func(s *Server) { s.log = l } }

// ReadOnly makes the server refuse every change with EROFS.
func ReadOnly() Option { return func(s *Server) { s.readOnly = true } }

// NewServer returns a 9P2000.L server that exports fsys.
func NewServer(fsys *disk.FS, opts ...Option) *Server {
	s := &Server{fsys: fsys, log: slog.New(slog.DiscardHandler),
		lns: map[net.Listener]struct{}{}, conns: map[net.Conn]struct{}{}}
	for _, o := range opts {
		o(s)
	}
	s.p9 = p9.NewServer(&attacher{s: s}, p9.WithServerLogger(ulogger{s.log}))
	return s
}

// ulogger passes the p9 package's messages to slog at debug level: it
// logs every request and reply, and malformed input, through the same call.
type ulogger struct{ l *slog.Logger }

func (u ulogger) Printf(format string, v ...any) {
	if u.l.Enabled(context.Background(), slog.LevelDebug) { // skip formatting every message
		u.l.Debug("9p: " + fmt.Sprintf(format, v...))
	}
}

func (u ulogger) Print(v ...any) {
	if u.l.Enabled(context.Background(), slog.LevelDebug) {
		u.l.Debug("9p: " + fmt.Sprint(v...))
	}
}

// Serve accepts connections on l until Close; it returns nil after Close.
func (s *Server) Serve(l net.Listener) error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		l.Close()
		return nil
	}
	s.lns[l] = struct{}{}
	s.mu.Unlock()
	var backoff unixsock.AcceptBackoff
	for {
		c, err := l.Accept()
		if err != nil {
			s.mu.Lock()
			closed := s.closed
			s.mu.Unlock()
			if closed {
				return nil
			}
			if in, ok := backoff.Wait(err); ok {
				s.log.Warn("9p accept failed; retried", "err", err, "after", in)
				continue
			}
			return fmt.Errorf("serve 9p: accept: %w", err)
		}
		backoff.Reset()
		s.mu.Lock()
		if s.closed {
			s.mu.Unlock()
			c.Close()
			return nil
		}
		s.conns[c] = struct{}{}
		s.wg.Add(1)
		s.mu.Unlock()
		go func() {
			defer s.wg.Done()
			s.log.Debug("9p client connected")
			s.handle(c)
			s.mu.Lock()
			delete(s.conns, c)
			s.mu.Unlock()
			s.log.Debug("9p client disconnected")
		}()
	}
}

// handle serves one connection. Handle returns when the client goes or
// Close closes c, after clunking (and so storing) every fid the client
// left open.
//
// hugelgupf/p9 v0.3.0 can panic in that teardown: a request goroutine
// loops back into pendingWg.Add while the connection's stop is in
// pendingWg.Wait ("WaitGroup is reused before previous Wait has
// returned"; fixed upstream in hugelgupf/p9#105, not in a release). The
// panic happens on this goroutine, so it is contained here, to the one
// connection. The fids it did not get to clunk stay open; their writes
// are stored by the next fsync of the file or by Close.
func (s *Server) handle(c net.Conn) {
	defer func() {
		if r := recover(); r != nil {
			s.log.Warn("9p connection teardown panicked in hugelgupf/p9; connection dropped, open files are stored at Close", "panic", fmt.Sprint(r))
			c.Close()
		}
	}()
	sendBuffer(c)
	_ = s.p9.Handle(s.translate(c))
}

// replyBuffer is the socket send buffer a connection asks for: two
// replies of the largest msize Linux negotiates (512 KiB), so that an
// Rread goes out in one writev while the client drains the one before,
// rather than in pieces the size of the default buffer (about 208 KiB),
// each waiting for the client to wake and read. The kernel caps it at
// net.core.wmem_max.
const replyBuffer = 1 << 20

// sendBuffer sets c's send buffer to replyBuffer where c has one. A
// failure only costs speed, so it is not reported.
func sendBuffer(c net.Conn) {
	if b, ok := c.(interface{ SetWriteBuffer(int) error }); ok {
		_ = b.SetWriteBuffer(replyBuffer)
	}
}

// Close stops accepting, closes client connections, and makes every write
// a client has done durable (fsys.Sync) before it returns. It reports any
// file whose writes could not be stored. Close the server before the
// filesystem or image: files still open hold unstored writes.
func (s *Server) Close() error {
	s.mu.Lock()
	s.closed = true
	for l := range s.lns {
		l.Close()
	}
	for c := range s.conns {
		c.Close()
	}
	s.mu.Unlock()
	s.wg.Wait()
	s.mu.Lock()
	errs := s.closeErr
	s.closeErr = nil
	s.mu.Unlock()
	// Flush, not just Sync: fids a dropped connection left open (see
	// handle) still hold writes
	if err := s.fsys.Flush(); err != nil {
		errs = append(errs, err)
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("close 9p server: %w", err)
	}
	return nil
}
