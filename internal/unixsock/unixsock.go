// Package unixsock owns the unix sockets keygate serves plaintext on (the
// 9P and NBD exports): private from their first instant, and open only to
// the peers' uids the operator allowed.
//
// A socket made with net.Listen and then chmod-ed is world-connectable for
// the moment in between (its mode comes from the umask), and the umask is
// process-wide, so changing it races every other goroutine that creates a
// file. Listen instead binds inside a fresh 0700 directory beside the
// target, sets the socket's mode there, and renames it into place: no other
// user can reach it before it is 0600.
package unixsock

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"syscall"
	"time"
)

// ErrInUse means another server listens on the socket path.
var ErrInUse = errors.New("another server is listening there (stop it, or choose another path)")

// ErrPeerRefused is logged (never returned by Accept) for a connection whose
// peer runs under a uid that is not allowed.
var ErrPeerRefused = errors.New("peer uid not allowed")

// Listener is a unix-socket listener that accepts only peers whose uid is
// allowed; it removes its socket file on Close.
type Listener struct {
	*net.UnixListener
	path    string
	allowed []uint32
	// OnRefused, if set, is called for each refused peer (uid, or -1 when
	// the credentials could not be read).
	OnRefused func(uid int64, err error)
}

// Listen creates a unix socket at path, which no other user could connect
// to at any moment, and accepts only connections from root, from this
// process's effective uid, and from allowUIDs. Its mode is 0600, or 0666
// when allowUIDs are given (connect needs write permission; the peer's uid
// is then the gate, and the directory holding path must let them reach it). An existing socket
// at path (a stale one from an earlier run) is replaced; anything else
// there is an error.
func Listen(path string, allowUIDs ...uint32) (*Listener, error) {
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode()&os.ModeSocket == 0 {
			return nil, fmt.Errorf("listen on %s: it exists and is not a socket (choose another path)", path)
		}
		// Replace a stale socket, never a live one: another server (a
		// second keygate on the same volume) would lose its clients.
		if c, err := net.Dial("unix", path); err == nil {
			c.Close()
			return nil, fmt.Errorf("listen on %s: %w", path, ErrInUse)
		}
	}
	dir, err := os.MkdirTemp(filepath.Dir(path), ".keygate-sock-")
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", path, err)
	}
	defer os.RemoveAll(dir)
	// MkdirTemp makes the directory 0700, so the socket inside it is
	// private even while its own mode still follows the umask.
	tmp := filepath.Join(dir, "s")
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: tmp, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", path, err)
	}
	// The listener must not unlink tmp on Close: the file moves to path.
	ln.SetUnlinkOnClose(false)
	// connect(2) needs write permission on the socket file: 0600 admits
	// only this uid (and root). With other uids allowed the file must be
	// writable by all, and SO_PEERCRED is the gate; it is never reachable
	// before that gate exists, inside the 0700 directory.
	mode := os.FileMode(0o600)
	if len(allowUIDs) > 0 {
		mode = 0o666
	}
	if err := os.Chmod(tmp, mode); err != nil {
		ln.Close()
		return nil, fmt.Errorf("listen on %s: %w", path, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		ln.Close()
		return nil, fmt.Errorf("listen on %s: %w", path, err)
	}
	allowed := append([]uint32{0, uint32(os.Geteuid())}, allowUIDs...)
	return &Listener{UnixListener: ln, path: path, allowed: allowed}, nil
}

// Path is the socket's path.
func (l *Listener) Path() string { return l.path }

// Accept returns the next connection from an allowed peer; connections from
// others are closed at once and reported to OnRefused.
func (l *Listener) Accept() (net.Conn, error) {
	for {
		c, err := l.UnixListener.AcceptUnix()
		if err != nil {
			return nil, err
		}
		uid, err := PeerUID(c)
		if err == nil && slices.Contains(l.allowed, uid) {
			return c, nil
		}
		c.Close()
		if l.OnRefused != nil {
			u := int64(-1)
			if err == nil {
				u = int64(uid)
				err = fmt.Errorf("%w: uid %s (allow it with --allow-uid)", ErrPeerRefused, strconv.FormatUint(uint64(uid), 10))
			}
			l.OnRefused(u, err)
		}
	}
}

// Close stops listening and removes the socket file.
func (l *Listener) Close() error {
	err := l.UnixListener.Close()
	if rmErr := os.Remove(l.path); rmErr != nil && !errors.Is(rmErr, os.ErrNotExist) && err == nil {
		err = rmErr
	}
	return err
}

// PeerUID is the uid of the process at the other end of c (SO_PEERCRED).
func PeerUID(c *net.UnixConn) (uint32, error) {
	raw, err := c.SyscallConn()
	if err != nil {
		return 0, fmt.Errorf("peer credentials: %w", err)
	}
	var cred *syscall.Ucred
	var credErr error
	if err := raw.Control(func(fd uintptr) {
		cred, credErr = syscall.GetsockoptUcred(int(fd), syscall.SOL_SOCKET, syscall.SO_PEERCRED)
	}); err != nil {
		return 0, fmt.Errorf("peer credentials: %w", err)
	}
	if credErr != nil {
		return 0, fmt.Errorf("peer credentials: %w", credErr)
	}
	return cred.Uid, nil
}

// AcceptBackoff paces a server's retries of Accept errors that pass (out of
// descriptors, perhaps a client opening many connections), as net/http
// does: failing instead would end serving, and keygate boot locks the
// volume when its server ends. The zero value is ready.
type AcceptBackoff struct{ d time.Duration }

// Wait sleeps before the next Accept and reports true for an error worth
// retrying; for any other it reports false at once.
func (b *AcceptBackoff) Wait(err error) (time.Duration, bool) {
	if !errors.Is(err, syscall.EMFILE) && !errors.Is(err, syscall.ENFILE) && !errors.Is(err, syscall.ECONNABORTED) {
		return 0, false
	}
	b.d = min(max(2*b.d, 5*time.Millisecond), time.Second)
	time.Sleep(b.d)
	return b.d, true
}

// Reset is called after each accepted connection.
func (b *AcceptBackoff) Reset() { b.d = 0 }
