package client

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/keygate/keygate/internal/testutil"
	"github.com/keygate/keygate/keysvc"
	"github.com/keygate/keygate/keysvc/api"
)

// service is a real key service in a temporary data directory.
type service struct {
	svc   *keysvc.Service
	dir   string
	ca    []byte
	token string
}

func startService(t testing.TB, opts ...keysvc.Option) *service {
	t.Helper()
	dir := t.TempDir()
	svc, err := keysvc.Start(context.Background(), keysvc.Config{DataDir: dir, Listen: "127.0.0.1:0", AdminListen: "127.0.0.1:0",
		Logger: slog.New(slog.DiscardHandler), Options: opts})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { svc.Shutdown(context.Background()) })
	s := &service{svc: svc, dir: dir}
	if s.ca, err = os.ReadFile(filepath.Join(dir, keysvc.CAFile)); err != nil {
		t.Fatal(err)
	}
	tok, err := os.ReadFile(filepath.Join(dir, keysvc.AdminTokenFile))
	if err != nil {
		t.Fatal(err)
	}
	s.token = strings.TrimSpace(string(tok))
	return s
}

func (s *service) vmURL() string    { return "https://" + s.svc.VMAddr() }
func (s *service) adminURL() string { return "https://" + s.svc.AdminAddr() }

// pubPEM is a fresh public key, PEM, as an enrollment takes one.
func pubPEM(t testing.TB) string {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.MarshalPKIXPublicKey(&k.PublicKey)
	if err != nil {
		t.Fatal(err)
	}
	return string(pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}))
}

func (s *service) cert(t testing.TB) tls.Certificate {
	t.Helper()
	c, err := tls.LoadX509KeyPair(filepath.Join(s.dir, keysvc.CertFile), filepath.Join(s.dir, keysvc.CertKeyFile))
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// TestFailover: a dead or unwell replica first in the list is passed over
// for a live one, which is then asked first; the live one's answer counts.
func TestFailover(t *testing.T) {
	s := startService(t)
	_, otherLeaf := issue(t)
	for _, tc := range []struct {
		name  string
		first func(t *testing.T) (url string, asked func() int32)
	}{
		{"connection-refused", func(t *testing.T) (string, func() int32) { return testutil.ClosedPort(t), nil }},
		{"no-tls-handshake", func(t *testing.T) (string, func() int32) { return testutil.BlackHole(t), nil }},
		{"503", func(t *testing.T) (string, func() int32) {
			f := testutil.FixedServer(t, s.cert(t), http.StatusServiceUnavailable, "")
			return f.URL, f.Requests
		}},
		{"503-retry-after", func(t *testing.T) (string, func() int32) {
			f := testutil.FixedServer(t, s.cert(t), http.StatusServiceUnavailable, "2")
			return f.URL, f.Requests
		}},
		{"502", func(t *testing.T) (string, func() int32) {
			f := testutil.FixedServer(t, s.cert(t), http.StatusBadGateway, "")
			return f.URL, f.Requests
		}},
		{"504", func(t *testing.T) (string, func() int32) {
			f := testutil.FixedServer(t, s.cert(t), http.StatusGatewayTimeout, "")
			return f.URL, f.Requests
		}},
		{"certificate-of-another-ca", func(t *testing.T) (string, func() int32) {
			f := testutil.FixedServer(t, otherLeaf, http.StatusOK, "")
			return f.URL, f.Requests
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			first, asked := tc.first(t)
			c, err := New(Config{URLs: []string{first, s.adminURL()}, CA: s.ca, Token: s.token})
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			for i := range 2 {
				var vms []api.VMInfo
				if err := c.Do(context.Background(), "GET", "/v1/admin/vms", "", nil, &vms); err != nil {
					t.Fatalf("call %d: %v", i, err)
				}
				if c.Current() != s.adminURL() {
					t.Fatalf("call %d: current replica %s, want the live %s", i, c.Current(), s.adminURL())
				}
			}
			// The second call went straight to the replica that answered.
			if asked != nil {
				if n := asked(); n > 1 {
					t.Fatalf("the unwell replica was asked %d times; want at most once", n)
				}
			}
		})
	}
}

// TestAnswerIsFinal: a denial, or any 4xx, from one replica is the
// answer; the next replica is never asked.
func TestAnswerIsFinal(t *testing.T) {
	s := startService(t)
	for _, tc := range []struct {
		name   string
		call   func(c *Client) error
		admin  bool
		check  func(t *testing.T, err error)
		before []string // replicas before the real one, all dead
	}{
		{"refusal", func(c *Client) error {
			_, err := c.Challenge(context.Background(), api.ChallengeRequest{VM: "nobody", Volume: "v", EKPub: pubPEM(t), AKPub: pubPEM(t)})
			return err
		}, false, func(t *testing.T, err error) {
			var r *Refusal
			if !errors.As(err, &r) || !errors.Is(err, ErrRefused) {
				t.Fatalf("err = %v (%T), want a *Refusal", err, err)
			}
		}, nil},
		{"refusal-after-a-dead-replica", func(c *Client) error {
			_, err := c.Challenge(context.Background(), api.ChallengeRequest{VM: "nobody", Volume: "v", EKPub: pubPEM(t), AKPub: pubPEM(t)})
			return err
		}, false, func(t *testing.T, err error) {
			if !errors.Is(err, ErrRefused) {
				t.Fatalf("err = %v, want a refusal", err)
			}
		}, []string{"closed"}},
		{"400", func(c *Client) error {
			return c.Do(context.Background(), "POST", "/v1/challenge", "", map[string]string{"no": "such field"}, nil)
		}, false, func(t *testing.T, err error) {
			var se *Error
			if !errors.As(err, &se) || se.StatusCode != http.StatusBadRequest || se.Message == "" {
				t.Fatalf("err = %v, want a 400 *Error with the service's message", err)
			}
		}, nil},
		{"401", func(c *Client) error {
			return c.Do(context.Background(), "GET", "/v1/admin/vms", "not-the-token", nil, nil)
		}, true, func(t *testing.T, err error) {
			var se *Error
			if !errors.As(err, &se) || se.StatusCode != http.StatusUnauthorized || se.Hint == "" {
				t.Fatalf("err = %v, want a 401 *Error with a hint", err)
			}
		}, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			real := s.vmURL()
			if tc.admin {
				real = s.adminURL()
			}
			var urls []string
			for range tc.before {
				urls = append(urls, testutil.ClosedPort(t))
			}
			next := testutil.FixedServer(t, s.cert(t), http.StatusOK, "")
			urls = append(urls, real, next.URL)
			c, err := New(Config{URLs: urls, CA: s.ca, Token: s.token})
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			tc.check(t, tc.call(c))
			if n := next.Requests(); n != 0 {
				t.Fatalf("the replica after the one that answered was asked %d times", n)
			}
			if c.Current() != real {
				t.Fatalf("current replica %s, want %s (it answered)", c.Current(), real)
			}
		})
	}
}

// TestNoneAnswers: when no replica answers, the error says why for each,
// and is worth retrying unless every one failed the CA check.
func TestNoneAnswers(t *testing.T) {
	s := startService(t)
	_, otherLeaf := issue(t)
	t.Run("unreachable", func(t *testing.T) {
		busy := testutil.FixedServer(t, s.cert(t), http.StatusServiceUnavailable, "7")
		dead := testutil.ClosedPort(t)
		c, err := New(Config{URLs: []string{dead, testutil.BlackHole(t), busy.URL}, CA: s.ca})
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		err = c.Do(context.Background(), "GET", "/v1/session", "tok", nil, nil)
		var ue *UnreachableError
		if !errors.As(err, &ue) {
			t.Fatalf("err = %v (%T), want *UnreachableError", err, err)
		}
		if ue.RetryAfter() != 7*time.Second {
			t.Fatalf("RetryAfter = %s, want the 7s the busy replica asked for", ue.RetryAfter())
		}
		for _, u := range []string{dead, busy.URL} {
			if !strings.Contains(err.Error(), u) {
				t.Errorf("error does not name replica %s: %v", u, err)
			}
		}
		if c.Current() != dead {
			t.Fatalf("current replica moved to %s although none answered", c.Current())
		}
	})
	t.Run("429-is-not-shopped", func(t *testing.T) {
		slow := testutil.FixedServer(t, s.cert(t), http.StatusTooManyRequests, "1")
		next := testutil.FixedServer(t, s.cert(t), http.StatusOK, "")
		c, err := New(Config{URLs: []string{slow.URL, next.URL}, CA: s.ca})
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		err = c.Do(context.Background(), "GET", "/v1/session", "tok", nil, nil)
		var ue *UnreachableError
		if !errors.As(err, &ue) || ue.RetryAfter() != time.Second {
			t.Fatalf("err = %v, want *UnreachableError with Retry-After 1s", err)
		}
		if next.Requests() != 0 {
			t.Fatal("a throttled request was sent on to the next replica")
		}
	})
	t.Run("all-untrusted", func(t *testing.T) {
		a := testutil.FixedServer(t, otherLeaf, http.StatusOK, "")
		b := testutil.FixedServer(t, otherLeaf, http.StatusOK, "")
		c, err := New(Config{URLs: []string{a.URL, b.URL}, CA: s.ca})
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		err = c.Do(context.Background(), "GET", "/v1/session", "tok", nil, nil)
		var ue *UnreachableError
		if !errors.Is(err, ErrTLS) || errors.As(err, &ue) {
			t.Fatalf("err = %v, want ErrTLS and not retryable", err)
		}
		if a.Requests()+b.Requests() != 0 {
			t.Fatal("a request reached an untrusted server")
		}
	})
	t.Run("context", func(t *testing.T) {
		c, err := New(Config{URLs: []string{testutil.BlackHole(t), s.vmURL()}, CA: s.ca, ConnectTimeout: time.Hour})
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		ctx, cancel := context.WithCancel(context.Background())
		go func() { time.Sleep(50 * time.Millisecond); cancel() }()
		if err := c.Do(ctx, "GET", "/v1/session", "tok", nil, nil); !errors.Is(err, context.Canceled) {
			t.Fatalf("err = %v, want context.Canceled", err)
		}
	})
}

// TestConnectTimeoutGrows: when every replica times out connecting, each
// further pass allows twice as long, so that a service that is merely far
// away is reached; once one answers, the bound is back to the configured
// one. (A bound of a microsecond cannot cover a TLS handshake; only the
// doubling gets the calls through.) A replica that refuses is down, not
// far: it does not make the bound grow.
func TestConnectTimeoutGrows(t *testing.T) {
	s := startService(t)
	_, port, _ := net.SplitHostPort(s.svc.VMAddr())
	far := []string{s.vmURL(), "https://localhost:" + port} // one service, two names
	t.Run("refused-does-not-grow", func(t *testing.T) {
		c, err := New(Config{URLs: []string{testutil.ClosedPort(t), testutil.ClosedPort(t)}, CA: s.ca, ConnectTimeout: time.Second})
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		for range 3 {
			c.Do(context.Background(), "GET", "/v1/session", "x", nil, nil)
		}
		if got := time.Duration(c.dialTO.Load()); got != time.Second {
			t.Fatalf("connect bound %s after refusals, want the configured 1s", got)
		}
	})
	c, err := New(Config{URLs: far, CA: s.ca, ConnectTimeout: time.Microsecond})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	var tries int
	for tries = 1; tries <= 40; tries++ {
		err = c.Do(context.Background(), "GET", "/v1/session", "not-a-session", nil, nil)
		var se *Error
		if errors.As(err, &se) && se.StatusCode == http.StatusUnauthorized {
			break
		}
		var ue *UnreachableError
		if !errors.As(err, &ue) {
			t.Fatalf("try %d: %v, want unreachable until the bound is long enough", tries, err)
		}
	}
	if tries > 40 {
		t.Fatalf("never connected: %v", err)
	}
	if got := time.Duration(c.dialTO.Load()); got != time.Microsecond {
		t.Fatalf("connect bound %s after an answer, want the configured 1µs", got)
	}
}
