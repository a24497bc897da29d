package boot

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"time"

	"github.com/keygate/keygate/attest"
	"github.com/keygate/keygate/keysvc"
)

// ErrRefused matches (errors.Is) every *Refusal: the key service answered,
// and said no. Retrying does not help; the operator must act.
var ErrRefused = errors.New("key service refused")

// Refusal is a 403 answer of the key service. Denial is set for a policy
// denial and carries the per-PCR diagnostics the service sent.
type Refusal struct {
	Reason string
	Hint   string
	Denial *attest.Denial
}

func (r *Refusal) Error() string {
	if r.Denial != nil {
		var b strings.Builder
		fmt.Fprintf(&b, "key service refused (%s): %s", r.Reason, r.Denial.Reason)
		for _, m := range r.Denial.Mismatches {
			if m.Missing {
				fmt.Fprintf(&b, "\n  PCR %d: not in the quote", m.PCR)
				continue
			}
			fmt.Fprintf(&b, "\n  PCR %d: got %s, allowed %s", m.PCR, m.Got, strings.Join(m.Allowed, " or "))
		}
		for _, rf := range r.Denial.Rules {
			fmt.Fprintf(&b, "\n  rule %s: want %s, got %s", rf.Rule, rf.Want, rf.Got)
		}
		return b.String()
	}
	if r.Hint != "" {
		return fmt.Sprintf("key service refused (%s): %s", r.Reason, r.Hint)
	}
	return fmt.Sprintf("key service refused (%s)", r.Reason)
}

// Is makes errors.Is(r, ErrRefused) true.
func (r *Refusal) Is(target error) bool { return target == ErrRefused }

// UnreachableError is a failure to get any answer from the key service
// (connection refused, timeout, 5xx): the one kind of failure Run retries.
type UnreachableError struct{ Err error }

func (e *UnreachableError) Error() string { return "key service unreachable: " + e.Err.Error() }
func (e *UnreachableError) Unwrap() error { return e.Err }

// ErrTLS matches a TLS failure that no retry can mend: the service's
// certificate is not signed by the pinned CA (a wrong --ca, or a machine in
// the middle).
var ErrTLS = errors.New("key service certificate not trusted")

// client talks to the key service's VM API over TLS 1.3 pinned to one CA.
type client struct {
	base string
	hc   *http.Client
	conf *tls.Config
	addr string // host:port, as the transport dials it

	mu        sync.Mutex
	pre       chan preDialed // nil, or the one pending warm dial
	preCancel context.CancelFunc
}

// preDialed is the outcome of warm's dial.
type preDialed struct {
	conn net.Conn
	err  error
	at   time.Time // when the handshake ended
}

// warmMaxAge is how long a warm connection may wait for its first request.
// The key service (as any Go server) drops a connection that sends nothing
// for 10 s after its handshake, and a hardware TPM can take that long to
// make an RSA EK; an older connection is closed and a fresh one dialed, so
// that the request never meets a dead connection.
var warmMaxAge = 5 * time.Second

// handshakeTimeout bounds one TCP connect plus TLS handshake.
const handshakeTimeout = 10 * time.Second

// CAFingerprint returns the lowercase hex SHA-256 of the first certificate
// (DER) in caPEM, as a keygate token stores it.
func CAFingerprint(caPEM []byte) (string, error) {
	cert, err := parseCA(caPEM)
	if err != nil {
		return "", err
	}
	sum := sha256.Sum256(cert.Raw)
	return hex.EncodeToString(sum[:]), nil
}

func parseCA(caPEM []byte) (*x509.Certificate, error) {
	blk, _ := pem.Decode(caPEM)
	if blk == nil || blk.Type != "CERTIFICATE" {
		return nil, errors.New("CA file holds no PEM certificate (use the key service's DATA/ca.pem)")
	}
	cert, err := x509.ParseCertificate(blk.Bytes)
	if err != nil {
		return nil, fmt.Errorf("parse CA certificate: %v", err)
	}
	return cert, nil
}

// newClient returns a client for base (https URL). With caPEM the server
// must chain to that CA, and when pin is also set the CA must have that
// fingerprint. With only pin, the server must present, in its chain, a CA
// certificate of that fingerprint that signs its leaf.
func newClient(base string, caPEM []byte, pin string) (*client, error) {
	u, err := url.Parse(base)
	if err != nil || u.Scheme != "https" || u.Host == "" {
		return nil, fmt.Errorf("key service URL %q must be https://HOST[:PORT]", base)
	}
	conf := &tls.Config{MinVersion: tls.VersionTLS13}
	switch {
	case caPEM != nil:
		ca, err := parseCA(caPEM)
		if err != nil {
			return nil, err
		}
		if pin != "" {
			sum := sha256.Sum256(ca.Raw)
			if subtle.ConstantTimeCompare([]byte(hex.EncodeToString(sum[:])), []byte(strings.ToLower(pin))) != 1 {
				return nil, fmt.Errorf("the --ca certificate (sha256 %x) is not the CA the volume's keygate token pins (%s); pass the key service's own DATA/ca.pem", sum, pin)
			}
		}
		pool := x509.NewCertPool()
		pool.AddCert(ca)
		conf.RootCAs = pool
	case pin != "":
		// Go's verifier needs the CA itself: take it from the chain the
		// server sends, but only the one whose hash is pinned.
		conf.InsecureSkipVerify = true
		host := u.Hostname()
		conf.VerifyConnection = func(cs tls.ConnectionState) error { return verifyPinned(cs, host, pin) }
	default:
		return nil, errors.New("no CA to trust: pass --ca DATA/ca.pem (the volume has no keygate token to take the CA fingerprint from)")
	}
	// The transport dials through dialTLS (so that a connection warm
	// made can be handed over), so ALPN must be asked for here.
	conf.NextProtos = []string{"h2", "http/1.1"}
	port := u.Port()
	if port == "" {
		port = "443"
	}
	c := &client{base: strings.TrimRight(base, "/"), conf: conf, addr: net.JoinHostPort(u.Hostname(), port)}
	tr := &http.Transport{DialTLSContext: c.dialTLS, ResponseHeaderTimeout: 30 * time.Second,
		MaxIdleConnsPerHost: 2, ForceAttemptHTTP2: true}
	c.hc = &http.Client{Transport: tr, Timeout: 60 * time.Second}
	return c, nil
}

// warm starts the TCP connect and TLS handshake to the key service in the
// background, so that it overlaps the TPM's key creation; the first
// request takes the connection over. It sends nothing but the handshake,
// which checks the key service's certificate as any other does.
func (c *client) warm() {
	ctx, cancel := context.WithCancel(context.Background())
	ch := make(chan preDialed, 1)
	c.mu.Lock()
	c.pre, c.preCancel = ch, cancel
	c.mu.Unlock()
	go func() {
		conn, err := c.dial(ctx, "tcp", c.addr)
		ch <- preDialed{conn, err, time.Now()}
	}()
}

// dialTLS is the transport's dialer: the warm connection if there is one
// for addr and it came up, a fresh one otherwise (which also retries a
// warm dial that failed, so its error is the one the request reports).
func (c *client) dialTLS(ctx context.Context, network, addr string) (net.Conn, error) {
	c.mu.Lock()
	ch, cancel := c.pre, c.preCancel
	if addr != c.addr {
		ch = nil
	}
	if ch != nil {
		c.pre, c.preCancel = nil, nil
	}
	c.mu.Unlock()
	if ch != nil {
		select {
		case p := <-ch:
			cancel()
			if p.err == nil && time.Since(p.at) < warmMaxAge {
				return p.conn, nil
			}
			if p.conn != nil {
				p.conn.Close()
			}
		case <-ctx.Done():
			cancel()
			go closePre(ch)
			return nil, ctx.Err()
		}
	}
	return c.dial(ctx, network, addr)
}

func (c *client) dial(ctx context.Context, network, addr string) (net.Conn, error) {
	ctx, cancel := context.WithTimeout(ctx, handshakeTimeout)
	defer cancel()
	d := tls.Dialer{Config: c.conf}
	return d.DialContext(ctx, network, addr)
}

// closePre closes the warm connection once its dial ends.
func closePre(ch chan preDialed) {
	if p := <-ch; p.conn != nil {
		p.conn.Close()
	}
}

func verifyPinned(cs tls.ConnectionState, host, pin string) error {
	if len(cs.PeerCertificates) == 0 {
		return fmt.Errorf("%w: no certificate presented", ErrTLS)
	}
	roots := x509.NewCertPool()
	found := false
	for _, c := range cs.PeerCertificates[1:] {
		sum := sha256.Sum256(c.Raw)
		if subtle.ConstantTimeCompare([]byte(hex.EncodeToString(sum[:])), []byte(strings.ToLower(pin))) == 1 {
			roots.AddCert(c)
			found = true
		}
	}
	if !found {
		return fmt.Errorf("%w: the server's chain holds no CA with the pinned sha256 %s (pass --ca DATA/ca.pem)", ErrTLS, pin)
	}
	_, err := cs.PeerCertificates[0].Verify(x509.VerifyOptions{Roots: roots, DNSName: host})
	if err != nil {
		return fmt.Errorf("%w: %v", ErrTLS, err)
	}
	return nil
}

func (c *client) close() {
	c.mu.Lock()
	ch, cancel := c.pre, c.preCancel
	c.pre, c.preCancel = nil, nil
	c.mu.Unlock()
	if ch != nil {
		cancel()
		go closePre(ch)
	}
	c.hc.CloseIdleConnections()
}

// do sends one request and decodes a 200 answer into out. A 403 becomes a
// *Refusal, a transport failure or a 5xx an *UnreachableError, a TLS trust
// failure ErrTLS, and any other status an error with the service's message.
func (c *client) do(ctx context.Context, method, path, bearer string, in, out any) error {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return err
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, c.base+path, body)
	if err != nil {
		return err
	}
	if in != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	if bearer != "" {
		req.Header.Set("Authorization", "Bearer "+bearer)
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		var ua x509.UnknownAuthorityError
		var hn x509.HostnameError
		var ci x509.CertificateInvalidError
		var tv *tls.CertificateVerificationError
		if errors.Is(err, ErrTLS) || errors.As(err, &ua) || errors.As(err, &hn) || errors.As(err, &ci) || errors.As(err, &tv) {
			return fmt.Errorf("%w: %v (is --ca the key service's DATA/ca.pem? a certificate from another CA may be a machine in the middle)", ErrTLS, err)
		}
		return &UnreachableError{Err: err}
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 4<<20))
	if err != nil {
		return &UnreachableError{Err: fmt.Errorf("read answer to %s: %w", path, err)}
	}
	switch {
	case resp.StatusCode == http.StatusOK:
		if err := json.Unmarshal(b, out); err != nil {
			return fmt.Errorf("%s: bad answer from the key service: %v", path, err)
		}
		return nil
	case resp.StatusCode == http.StatusForbidden:
		return parseRefusal(b)
	case resp.StatusCode >= 500 || resp.StatusCode == http.StatusTooManyRequests:
		return &UnreachableError{Err: fmt.Errorf("%s answered %s%s", path, resp.Status, bodyMessage(b))}
	}
	return fmt.Errorf("%s: key service answered %s%s", path, resp.Status, bodyMessage(b))
}

func bodyMessage(b []byte) string {
	var eb keysvc.ErrorBody
	if json.Unmarshal(b, &eb) != nil || eb.Error == "" {
		return ""
	}
	if eb.Hint != "" {
		return ": " + eb.Error + " (" + eb.Hint + ")"
	}
	return ": " + eb.Error
}

func parseRefusal(b []byte) error {
	var raw struct {
		keysvc.Refusal
		Mismatches json.RawMessage `json:"mismatches"`
	}
	if err := json.Unmarshal(b, &raw); err != nil {
		return &Refusal{Reason: "unknown", Hint: "unparseable 403 body"}
	}
	r := &Refusal{Reason: raw.Reason, Hint: raw.Hint}
	if raw.Mismatches != nil {
		d := &attest.Denial{}
		if err := json.Unmarshal(b, d); err == nil {
			r.Reason, r.Denial = keysvc.ReasonPolicy, d
		}
	}
	return r
}
