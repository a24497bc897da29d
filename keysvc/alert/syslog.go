package alert

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net"
	"net/url"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Syslog sends each alert as one RFC 5424 message over TCP, or TLS (RFC
// 5425), with octet-counting framing (RFC 6587: "LEN SP MSG"). TCP has no
// answer: an alert counts as delivered once it is written whole.
type Syslog struct {
	network string // "tcp" or "tls"
	addr    string
	label   string
	roots   *x509.CertPool
	host    string
	pid     int

	mu   sync.Mutex
	conn net.Conn
}

// Syslog facility of keysvc's messages: authpriv (security/authorization).
const syslogFacility = 10

// SDID is the structured-data ID of keysvc's messages. 32473 is the
// enterprise number RFC 5612 sets aside for documentation; keygate has
// none of its own yet.
const SDID = "keygate@32473"

// NewSyslog returns the n-th syslog sink for "tcp://HOST:PORT" or
// "tls://HOST:PORT"; roots, if not nil, are the CAs a TLS server is checked
// against (the system's otherwise).
func NewSyslog(n int, target string, roots *x509.CertPool) (*Syslog, error) {
	u, err := url.Parse(target)
	if err != nil || (u.Scheme != "tcp" && u.Scheme != "tls") || u.Host == "" || u.Port() == "" || u.Path != "" {
		return nil, fmt.Errorf("alert syslog %q is not tcp://HOST:PORT or tls://HOST:PORT", target)
	}
	host, _ := os.Hostname()
	return &Syslog{network: u.Scheme, addr: u.Host, label: "syslog-" + strconv.Itoa(n), roots: roots, host: host, pid: os.Getpid()}, nil
}

// ID implements Sink.
func (s *Syslog) ID() string {
	h := sha256.Sum256([]byte(s.network + "://" + s.addr))
	return "syslog:" + hex.EncodeToString(h[:12])
}

// Label implements Sink.
func (s *Syslog) Label() string { return s.label }

func (s *Syslog) dial(ctx context.Context) (net.Conn, error) {
	d := &net.Dialer{Timeout: 10 * time.Second, KeepAlive: 30 * time.Second}
	if s.network == "tls" {
		host, _, _ := net.SplitHostPort(s.addr)
		td := &tls.Dialer{NetDialer: d, Config: &tls.Config{RootCAs: s.roots, ServerName: host, MinVersion: tls.VersionTLS12}}
		return td.DialContext(ctx, "tcp", s.addr)
	}
	return d.DialContext(ctx, "tcp", s.addr)
}

// Deliver implements Sink.
func (s *Syslog) Deliver(ctx context.Context, d Delivery) error {
	msg, err := s.Message(d, time.Now())
	if err != nil {
		return err
	}
	frame := strconv.Itoa(len(msg)) + " " + msg
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.conn == nil {
		c, err := s.dial(ctx)
		if err != nil {
			return fmt.Errorf("%s (%s://%s): %w", s.label, s.network, s.addr, err)
		}
		s.conn = c
	}
	if dl, ok := ctx.Deadline(); ok {
		s.conn.SetWriteDeadline(dl)
	}
	if _, err := s.conn.Write([]byte(frame)); err != nil {
		s.conn.Close()
		s.conn = nil
		return fmt.Errorf("%s (%s://%s): %w", s.label, s.network, s.addr, err)
	}
	return nil
}

// Close implements Sink.
func (s *Syslog) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.conn != nil {
		err := s.conn.Close()
		s.conn = nil
		return err
	}
	return nil
}

// bodyEvent is what Message reads of an alert's body.
type bodyEvent struct {
	Event struct {
		ID       int64  `json:"id"`
		VM       string `json:"vm"`
		Volume   string `json:"volume"`
		Kind     string `json:"kind"`
		Severity string `json:"severity"`
		PID      int    `json:"pid"`
		Comm     string `json:"comm"`
		Mode     string `json:"mode"`
		Denied   bool   `json:"denied"`
		Overlap  bool   `json:"overlap"`
	} `json:"event"`
}

// Message is d as one RFC 5424 message (without the octet count):
// <PRI>1 TIMESTAMP HOSTNAME keysvc PROCID KIND [keygate@32473 …] BOM+JSON.
func (s *Syslog) Message(d Delivery, now time.Time) (string, error) {
	var b bodyEvent
	if err := json.Unmarshal(d.Body, &b); err != nil {
		return "", fmt.Errorf("%s: alert body: %v", s.label, err)
	}
	e := b.Event
	sev := 6 // informational
	switch e.Severity {
	case "critical":
		sev = 2
	case "warning":
		sev = 4
	}
	var sd strings.Builder
	sd.WriteString("[" + SDID)
	for _, p := range [][2]string{{"event_id", strconv.FormatInt(d.EventID, 10)}, {"key", d.Key}, {"vm", e.VM}, {"volume", e.Volume},
		{"kind", e.Kind}, {"severity", e.Severity}, {"pid", strconv.Itoa(e.PID)}, {"comm", e.Comm}, {"mode", e.Mode},
		{"denied", strconv.FormatBool(e.Denied)}, {"overlap", strconv.FormatBool(e.Overlap)}} {
		sd.WriteString(" " + p[0] + `="` + sdEscape(p[1]) + `"`)
	}
	sd.WriteString("]")
	return fmt.Sprintf("<%d>1 %s %s keysvc %d %s %s \ufeff%s", syslogFacility*8+sev, now.UTC().Format("2006-01-02T15:04:05.000000Z"),
		header(s.host, 255), s.pid, header(e.Kind, 32), sd.String(), d.Body), nil
}

// header is v as a header field: printable US-ASCII, at most n bytes, or
// "-" (the NILVALUE).
func header(v string, n int) string {
	var b strings.Builder
	for _, c := range []byte(v) {
		if c > 32 && c < 127 && b.Len() < n {
			b.WriteByte(c)
		}
	}
	if b.Len() == 0 {
		return "-"
	}
	return b.String()
}

// sdEscape escapes a PARAM-VALUE: '"', '\' and ']' take a backslash.
func sdEscape(v string) string {
	return strings.NewReplacer(`\`, `\\`, `"`, `\"`, `]`, `\]`).Replace(v)
}
