package tpm

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/google/go-tpm/legacy/tpm2"
)

// Kind says what sort of TPM a [TPM] talks to.
type Kind int

const (
	// Device is a kernel TPM character device, normally /dev/tpmrm0.
	Device Kind = iota + 1
	// Swtpm is a swtpm process reached over its unix server socket.
	Swtpm
	// Simulator is the go-tpm-tools in-process simulator. It is fresh in
	// every process, so its EK changes from one run to the next.
	Simulator
)

func (k Kind) String() string {
	switch k {
	case Device:
		return "device"
	case Swtpm:
		return "swtpm"
	case Simulator:
		return "simulator"
	}
	return fmt.Sprintf("Kind(%d)", int(k))
}

// DefaultDevice is the kernel's resource-managed TPM device.
const DefaultDevice = "/dev/tpmrm0"

// ErrBadSpec is wrapped by [Open]'s error for a spec in none of its forms.
var ErrBadSpec = errors.New("use " + DefaultDevice + ", swtpm:SOCKET or sim")

// ErrNotTPM is returned by [Open] when the spec names something that exists
// but does not answer like a TPM 2.0.
var ErrNotTPM = errors.New("not a TPM 2.0")

// commandTimeout bounds one command on a socket, so that a peer that is not
// a TPM (or a wedged swtpm) cannot hang the caller. Key creation on a slow
// software TPM takes well under a second; RSA key generation can take a few.
const commandTimeout = 30 * time.Second

// probeTimeout bounds the first command sent to a socket by Open.
const probeTimeout = 5 * time.Second

// TPM is an open TPM. Its methods are safe for concurrent use; commands are
// serialized, since a socket or simulator carries one command at a time.
type TPM struct {
	mu   sync.Mutex
	rw   io.ReadWriteCloser
	kind Kind
	spec string
	// eventLogPath is where EventLog reads the firmware log; empty for
	// TPMs that have none (swtpm, simulator).
	eventLogPath string
	closed       bool
}

// Open opens the TPM named by spec:
//
//	/dev/tpmrm0      the kernel's resource-managed TPM device (any /dev/tpm* path)
//	swtpm:SOCKET     a swtpm started with --server type=unixio,path=SOCKET
//	                 and --flags not-need-init,startup-clear
//	sim              the go-tpm-tools in-process simulator (one per process;
//	                 its EK differs in every process)
//
// For a socket, Open keeps one connection for the TPM's lifetime and checks
// that the peer answers like a TPM 2.0 before returning. The caller must
// Close the TPM.
func Open(spec string) (*TPM, error) {
	switch {
	case spec == "sim":
		return openSim()
	case strings.HasPrefix(spec, "swtpm:"):
		path := strings.TrimPrefix(spec, "swtpm:")
		if path == "" {
			return nil, fmt.Errorf("TPM %q names no socket: %w", spec, ErrBadSpec)
		}
		return openSocket(spec, path)
	case strings.HasPrefix(spec, "/dev/tpm"):
		return openDevice(spec)
	case spec == "":
		return nil, fmt.Errorf("no TPM given: %w", ErrBadSpec)
	}
	return nil, fmt.Errorf("unknown TPM %q: %w", spec, ErrBadSpec)
}

func openDevice(path string) (*TPM, error) {
	fi, err := os.Stat(path)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("open TPM %s: no such device (is this a VM with a vTPM, and is the tpm_crb or tpm_tis module loaded?)", path)
		}
		return nil, fmt.Errorf("open TPM %s: %w", path, err)
	}
	if fi.Mode()&os.ModeDevice == 0 {
		return nil, fmt.Errorf("open TPM %s: %w: it is not a device; use %s, swtpm:SOCKET for a socket, or sim", path, ErrNotTPM, DefaultDevice)
	}
	rw, err := tpm2.OpenTPM(path)
	if err != nil {
		if errors.Is(err, os.ErrPermission) {
			return nil, fmt.Errorf("open TPM %s: %w (run as root or join the tss group)", path, err)
		}
		return nil, fmt.Errorf("open TPM %s: %w", path, err)
	}
	t := &TPM{rw: rw, kind: Device, spec: path}
	if _, err := os.Stat(eventLogFile); err == nil {
		t.eventLogPath = eventLogFile
	}
	if err := t.probe(); err != nil {
		rw.Close()
		return nil, fmt.Errorf("open TPM %s: %w", path, err)
	}
	return t, nil
}

func openSocket(spec, path string) (*TPM, error) {
	fi, err := os.Stat(path)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("open TPM %s: socket %s does not exist (start swtpm socket --tpm2 --server type=unixio,path=%s --flags not-need-init,startup-clear)", spec, path, path)
		}
		return nil, fmt.Errorf("open TPM %s: %w", spec, err)
	}
	if fi.Mode()&os.ModeSocket == 0 {
		return nil, fmt.Errorf("open TPM %s: %s is not a unix socket; swtpm:SOCKET needs swtpm's --server type=unixio,path=SOCKET", spec, path)
	}
	conn, err := net.DialTimeout("unix", path, probeTimeout)
	if err != nil {
		return nil, fmt.Errorf("open TPM %s: dial: %w (is swtpm running?)", spec, err)
	}
	sc := &sockConn{conn: conn, timeout: probeTimeout}
	t := &TPM{rw: sc, kind: Swtpm, spec: spec}
	if err := t.probe(); err != nil {
		conn.Close()
		return nil, fmt.Errorf("open TPM %s: %w", spec, err)
	}
	sc.timeout = commandTimeout
	return t, nil
}

// probe sends one harmless command and checks the answer is a TPM 2.0 one.
func (t *TPM) probe() error {
	vals, _, err := tpm2.GetCapability(t.rw, tpm2.CapabilityTPMProperties, 1, uint32(tpm2.FamilyIndicator))
	if err != nil {
		hint := "is it a TPM 2.0 (not a TPM 1.2)?"
		if t.kind == Swtpm {
			hint = "is this the swtpm server socket (not --ctrl), started with --tpm2 and --flags not-need-init,startup-clear?"
		}
		return fmt.Errorf("%w: no valid answer to TPM2_GetCapability (%v); %s", ErrNotTPM, err, hint)
	}
	if len(vals) == 0 {
		return fmt.Errorf("%w: TPM2_GetCapability returned no properties", ErrNotTPM)
	}
	return nil
}

// Close flushes nothing (nothing is left loaded) and releases the TPM. It is
// safe to call more than once.
func (t *TPM) Close() error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		return nil
	}
	t.closed = true
	if err := t.rw.Close(); err != nil {
		return fmt.Errorf("close TPM %s: %w", t.spec, err)
	}
	return nil
}

// Kind reports what sort of TPM this is.
func (t *TPM) Kind() Kind { return t.kind }

// Spec returns the spec the TPM was opened with, e.g. "swtpm:/run/swtpm.sock".
func (t *TPM) Spec() string { return t.spec }

// lock takes the command lock and fails if the TPM was closed.
func (t *TPM) lock() error {
	t.mu.Lock()
	if t.closed {
		t.mu.Unlock()
		return fmt.Errorf("TPM %s is closed", t.spec)
	}
	return nil
}

// sockConn is one persistent connection to a swtpm server socket. Each Read
// returns exactly one whole TPM response, as tpmutil.RunCommandRaw expects
// (it reads once): the stream is framed by the size field of the response
// header. go-tpm's own socket type redials for every command instead, which
// breaks multi-command sequences on swtpm.
type sockConn struct {
	conn    net.Conn
	timeout time.Duration
	pending []byte // rest of a response that did not fit the caller's buffer
}

func (s *sockConn) Write(p []byte) (int, error) {
	if err := s.conn.SetDeadline(time.Now().Add(s.timeout)); err != nil {
		return 0, err
	}
	s.pending = nil
	return s.conn.Write(p)
}

func (s *sockConn) Read(p []byte) (int, error) {
	if len(s.pending) == 0 {
		var hdr [10]byte // tag (2), size (4), response code (4)
		if _, err := io.ReadFull(s.conn, hdr[:]); err != nil {
			return 0, fmt.Errorf("read TPM response header: %w", err)
		}
		size := binary.BigEndian.Uint32(hdr[2:6])
		if size < 10 || size > 1<<20 {
			return 0, fmt.Errorf("read TPM response: bad size %d in header (peer is not a TPM 2.0)", size)
		}
		buf := make([]byte, size)
		copy(buf, hdr[:])
		clear(hdr[:])
		if _, err := io.ReadFull(s.conn, buf[10:]); err != nil {
			return 0, fmt.Errorf("read TPM response body: %w", err)
		}
		s.pending = buf
	}
	n := copy(p, s.pending)
	clear(s.pending[:n]) // responses can carry secrets (Import's unseal)
	s.pending = s.pending[n:]
	return n, nil
}

func (s *sockConn) Close() error { return s.conn.Close() }
