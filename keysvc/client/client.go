package client

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Defaults of Config.
const (
	// DefaultConnectTimeout bounds the TCP connect plus TLS handshake to
	// one replica when there are several: what a dead replica costs before
	// the next is tried.
	DefaultConnectTimeout = 300 * time.Millisecond
	// SingleConnectTimeout is the bound with one URL, where there is no
	// one else to ask and a slow link must still get through.
	SingleConnectTimeout = 10 * time.Second
	// DefaultResponseTimeout bounds the wait for an answer's headers once
	// the request is sent.
	DefaultResponseTimeout = 30 * time.Second
)

// Config says which service to reach and how to trust it.
type Config struct {
	// URLs are the base URLs (https://HOST[:PORT]) of the replicas of one
	// API (the VM API or the admin API), tried in this order.
	URLs []string
	// CA is the service's CA certificate, PEM (DATA/ca.pem). CAPin is its
	// SHA-256, lowercase hex. With both they must agree; with only CAPin
	// the CA is taken from the server's chain. One of them is required:
	// the system's roots are never trusted.
	CA    []byte
	CAPin string
	// Token is the admin API's bearer token (admin calls only).
	Token string
	// ConnectTimeout bounds the TCP connect plus TLS handshake to one
	// replica: DefaultConnectTimeout with several URLs,
	// SingleConnectTimeout with one. When every replica of a pass timed
	// out connecting, the next pass allows twice as long (up to
	// SingleConnectTimeout), so that a slow link still gets through; an
	// answer resets it.
	ConnectTimeout time.Duration
	// ResponseTimeout bounds the wait for an answer once a request is
	// sent (DefaultResponseTimeout).
	ResponseTimeout time.Duration
}

// Client talks to one key service API over TLS 1.3, failing over across
// its replicas. It is safe for concurrent use.
type Client struct {
	reps    []*replica
	token   string
	cur     atomic.Int32 // index of the replica that answered last
	connect time.Duration
	dialTO  atomic.Int64 // current connect bound, ns: connect, doubled after a pass without any connection
	caSum   [32]byte     // SHA-256 of the trusted CA (DER)
}

// replica is one base URL with its own transport, so that each keeps its
// connections and the warm dial can be handed to its transport.
type replica struct {
	base string
	addr string // host:port, as the transport dials it
	c    *Client
	conf *tls.Config
	hc   *http.Client

	mu        sync.Mutex
	pre       chan preDialed // nil, or the one pending warm dial
	preCancel context.CancelFunc
}

// ParseURLs splits a comma-separated list of base URLs (as --keysvc takes
// it), trimming spaces and empty items.
func ParseURLs(list string) []string {
	var out []string
	for _, u := range strings.Split(list, ",") {
		if u = strings.TrimSpace(u); u != "" {
			out = append(out, u)
		}
	}
	return out
}

// CheckURL fails unless u is https://HOST[:PORT] with nothing after but an
// optional path prefix.
func CheckURL(u string) error {
	p, err := url.Parse(u)
	if err != nil || p.Scheme != "https" || p.Host == "" || p.RawQuery != "" || p.Fragment != "" {
		return fmt.Errorf("key service URL %q must be https://HOST[:PORT]", u)
	}
	return nil
}

// New returns a client for cfg's replicas. Nothing is dialed yet.
func New(cfg Config) (*Client, error) {
	if len(cfg.URLs) == 0 {
		return nil, errors.New("no key service URL")
	}
	var ca *x509.Certificate
	if cfg.CA != nil {
		var err error
		if ca, err = ParseCA(cfg.CA); err != nil {
			return nil, err
		}
		if cfg.CAPin != "" {
			if err := checkPin(ca, cfg.CAPin); err != nil {
				return nil, err
			}
		}
	}
	c := &Client{token: cfg.Token, connect: cfg.ConnectTimeout}
	switch {
	case ca != nil:
		c.caSum = sha256.Sum256(ca.Raw)
	case cfg.CAPin != "":
		sum, err := hex.DecodeString(cfg.CAPin)
		if err != nil || len(sum) != sha256.Size {
			return nil, fmt.Errorf("CA pin %q is not a SHA-256 in hex (64 digits): recreate the volume's keygate token, or pass --ca DATA/ca.pem", cfg.CAPin)
		}
		c.caSum = [32]byte(sum)
	}
	if c.connect <= 0 {
		c.connect = DefaultConnectTimeout
		if len(cfg.URLs) == 1 {
			c.connect = SingleConnectTimeout
		}
	}
	c.dialTO.Store(int64(c.connect))
	respTO := cfg.ResponseTimeout
	if respTO <= 0 {
		respTO = DefaultResponseTimeout
	}
	seen := map[string]bool{}
	for _, raw := range cfg.URLs {
		if err := CheckURL(raw); err != nil {
			return nil, err
		}
		u, _ := url.Parse(raw)
		base := strings.TrimRight(raw, "/")
		if seen[base] {
			return nil, fmt.Errorf("key service URL %q is listed twice", raw)
		}
		seen[base] = true
		conf, err := tlsConfig(ca, cfg.CAPin, u.Hostname())
		if err != nil {
			return nil, err
		}
		port := u.Port()
		if port == "" {
			port = "443"
		}
		r := &replica{base: base, addr: net.JoinHostPort(u.Hostname(), port), c: c, conf: conf}
		tr := &http.Transport{DialTLSContext: r.dialTLS, ResponseHeaderTimeout: respTO,
			MaxIdleConnsPerHost: 2, ForceAttemptHTTP2: true}
		r.hc = &http.Client{Transport: tr, Timeout: 2 * respTO}
		c.reps = append(c.reps, r)
	}
	return c, nil
}

// CASHA256 is the SHA-256 of the CA certificate (DER) that every replica
// must chain to: what the VM's quotes bind (api.QuoteData).
func (c *Client) CASHA256() [32]byte { return c.caSum }

// URLs are the replicas' base URLs, in the configured order.
func (c *Client) URLs() []string {
	out := make([]string, len(c.reps))
	for i, r := range c.reps {
		out[i] = r.base
	}
	return out
}

// Current is the base URL of the replica tried first: the one that
// answered last, or the first configured.
func (c *Client) Current() string { return c.reps[c.cur.Load()].base }

// Close drops idle connections and any pending warm dial.
func (c *Client) Close() {
	for _, r := range c.reps {
		r.close()
	}
}

// Do sends one request to the API and decodes a 2xx answer into out (nil,
// a *[]byte for the raw body, or a value for JSON). bearer, when set, is
// the Authorization; admin calls use the Config's Token.
//
// It asks the replicas in turn, starting with the one that answered last:
// a replica that gives no answer (refused, timed out, TLS failed, reset)
// or answers 5xx costs its connect timeout and the next is asked. Any other
// answer is final: a 403 is a *Refusal, a 429 an *UnreachableError (retry
// later; asking elsewhere would dodge the rate limit), another status an
// *Error. When no replica answered, the error is an *UnreachableError
// naming each one's failure, or ErrTLS when every one failed the CA check.
func (c *Client) Do(ctx context.Context, method, path, bearer string, in, out any) error {
	var body []byte
	if in != nil {
		var err error
		if body, err = json.Marshal(in); err != nil {
			return err
		}
		// A body may carry a key (volume import): wipe it once sent.
		defer clear(body)
	}
	n := len(c.reps)
	start := int(c.cur.Load())
	var errs []error
	timeouts, trust := 0, 0
	for i := range n {
		idx := (start + i) % n
		r := c.reps[idx]
		answered, err := r.do(ctx, method, path, bearer, body, out)
		if err == nil {
			c.settle(idx)
			return nil
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		var se *Error
		switch {
		case errors.As(err, &se) && !se.failover():
			c.settle(idx)
			if se.Temporary() {
				return &UnreachableError{Err: err}
			}
			return err
		case errors.Is(err, ErrRefused):
			c.settle(idx)
			return err
		case answered && se == nil:
			// A 2xx whose body does not decode: the replica answered,
			// and may have acted on the request.
			c.settle(idx)
			return err
		case errors.Is(err, ErrTLS):
			trust++
		case isTimeout(err):
			timeouts++
		}
		if n > 1 {
			err = fmt.Errorf("%s: %w", r.base, err)
		}
		errs = append(errs, err)
	}
	if timeouts == n {
		// Every replica timed out connecting (none refused, none was
		// reached): allow the next pass more, in case they are merely
		// far away. A replica that refuses is down, not far.
		c.dialTO.Store(min(2*c.dialTO.Load(), int64(max(c.connect, SingleConnectTimeout))))
	}
	joined := errors.Join(errs...)
	if trust == n {
		return joined
	}
	return &UnreachableError{Err: joined}
}

// settle makes idx the replica tried first, and resets the connect bound
// now that a replica answered.
func (c *Client) settle(idx int) {
	c.cur.Store(int32(idx))
	c.dialTO.Store(int64(c.connect))
}

// do sends one request to this replica. answered says whether its answer
// (status and body) arrived.
func (r *replica) do(ctx context.Context, method, path, bearer string, body []byte, out any) (bool, error) {
	var rd io.Reader
	if body != nil {
		rd = bytes.NewReader(body)
	}
	req, err := http.NewRequestWithContext(ctx, method, r.base+path, rd)
	if err != nil {
		return false, err
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	switch {
	case bearer != "":
		req.Header.Set("Authorization", "Bearer "+bearer)
	case r.c.token != "":
		req.Header.Set("Authorization", "Bearer "+r.c.token)
	}
	resp, err := r.hc.Do(req)
	if err != nil {
		if ctx.Err() != nil {
			return false, ctx.Err()
		}
		if isTrustFailure(err) {
			return false, fmt.Errorf("%w: %v (is the CA the key service's DATA/ca.pem? a certificate from another CA may be a machine in the middle)", ErrTLS, err)
		}
		return false, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	if err != nil {
		return false, fmt.Errorf("read answer to %s: %w", path, err)
	}
	return true, Decode(path, resp.StatusCode, resp.Status, resp.Header, b, out)
}

// isTimeout reports whether err is a connect or handshake that ran out of
// time.
func isTimeout(err error) bool {
	var ne net.Error
	return errors.Is(err, context.DeadlineExceeded) || errors.As(err, &ne) && ne.Timeout()
}
