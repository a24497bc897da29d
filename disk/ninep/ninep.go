// Package ninep exports an unlocked disk.FS as a 9P2000.L file server on
// a stream socket (a unix socket for `mount -t 9p -o trans=unix`). It owns
// the mapping from 9P operations and errnos onto disk.FS; it does not own
// the filesystem, the volume keys or the socket's lifetime policy.
package ninep

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strings"
	"sync"

	"github.com/keygate/keygate/disk"
	"github.com/keygate/keygate/internal/unixsock"
)

// Server serves one disk.FS over 9P2000.L.
type Server struct {
	fsys     *disk.FS
	log      *slog.Logger
	readOnly bool
	locks    lockTable

	// tree orders requests against renames and unlinks: every request
	// holds it shared while it uses a fid's path; Trenameat, Trename,
	// Tunlinkat and Tremove hold it alone while they change the tree and
	// the paths (and deleted marks) of the fids it affects.
	tree    sync.RWMutex
	filesMu sync.Mutex
	files   map[*file]struct{} // every fid of every connection

	mu       sync.Mutex
	closed   bool
	lns      map[net.Listener]struct{}
	conns    map[net.Conn]struct{}
	wg       sync.WaitGroup
	closeErr []error // flushes that failed while Close clunked the fids
}

// clunked records a failed flush of a fid closed by Close, which no
// client is left to hear, so that Close can report it.
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
		lns: map[net.Listener]struct{}{}, conns: map[net.Conn]struct{}{}, files: map[*file]struct{}{}}
	for _, o := range opts {
		o(s)
	}
	return s
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

// handle serves one connection until the client goes or Close closes
// it, then clunks (and so stores) every fid the client left open.
func (s *Server) handle(c net.Conn) {
	sendBuffer(c)
	newConn(s, c).serve()
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
	// Flush, not just Sync: belt and braces for any file a connection's
	// teardown could not close
	if err := s.fsys.Flush(); err != nil {
		errs = append(errs, err)
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("close 9p server: %w", err)
	}
	return nil
}

func (s *Server) register(f *file) {
	s.filesMu.Lock()
	s.files[f] = struct{}{}
	s.filesMu.Unlock()
}

func (s *Server) unregister(f *file) {
	s.filesMu.Lock()
	delete(s.files, f)
	s.filesMu.Unlock()
}

// clunk forgets fid f and closes it, storing its writes; it waits for the
// requests still using it.
func (s *Server) clunk(f *file) error {
	s.unregister(f)
	s.tree.RLock()
	defer s.tree.RUnlock()
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.Close()
}

// under reports whether p is dir or inside it.
func under(p, dir string) bool {
	return p == dir || strings.HasPrefix(p, dir+"/") || dir == "/"
}

// markDeleted marks every fid at or under p as naming a removed file: it
// can still read and write what it has open, but no longer walk, open or
// change the tree, so that it never reaches a new file given the same
// name. The caller holds tree alone.
func (s *Server) markDeleted(p string) {
	s.filesMu.Lock()
	defer s.filesMu.Unlock()
	for f := range s.files {
		if under(f.path, p) {
			f.deleted = true
		}
	}
}

// rename moves od/oldName to nd/newName and then every fid at or under
// the old path to the new one, as a local file descriptor follows its
// file; fids of a file the rename replaced are marked deleted. The caller
// holds tree alone.
func (s *Server) rename(od *file, oldName string, nd *file, newName string) error {
	o, n := od.child(oldName), nd.child(newName)
	if o == n {
		return nil
	}
	if err := od.RenameAt(oldName, nd, newName); err != nil {
		return err
	}
	s.markDeleted(n)
	s.filesMu.Lock()
	defer s.filesMu.Unlock()
	for f := range s.files {
		if !f.deleted && under(f.path, o) {
			f.path = n + strings.TrimPrefix(f.path, o)
		}
	}
	return nil
}
