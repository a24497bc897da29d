package keysvc_test

import (
	"bufio"
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/keygate/keygate/keysvc"
	"github.com/keygate/keygate/keysvc/alert"
	"github.com/keygate/keygate/keysvc/api"
)

// metric reads one sample of the admin listener's /metrics (0 if absent).
func (e *env) metric(t *testing.T, name string) float64 {
	t.Helper()
	code, b := e.do(t, "GET", "https://"+e.svc.AdminAddr()+"/metrics", "", nil)
	if code != http.StatusOK {
		t.Fatalf("/metrics: %d", code)
	}
	var sum float64
	found := false
	for _, l := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(l, name+" ") || strings.HasPrefix(l, name+"{") {
			f := strings.Fields(l)
			v, _ := strconv.ParseFloat(f[len(f)-1], 64)
			sum, found = sum+v, true
		}
	}
	if !found {
		return 0
	}
	return sum
}

// waitFor polls cond; the bound is a hang guard, not a threshold.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(60 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		if cond() {
			return
		}
	}
	t.Fatalf("no %s within 60s", what)
}

// testServerTLS returns httptest's server certificate (the same in every
// httptest server) and a pool that trusts it.
func testServerTLS(t *testing.T) (tls.Certificate, *x509.CertPool) {
	tmp := httptest.NewTLSServer(http.NotFoundHandler())
	defer tmp.Close()
	pool := x509.NewCertPool()
	pool.AddCert(tmp.Certificate())
	return tmp.TLS.Certificates[0], pool
}

// freeAddr is a loopback address nothing listens on (yet).
func freeAddr(t *testing.T) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// TestWebhookAcrossRestart: an alert raised while the receiver is down is
// kept in the outbox, survives a key service restart, and reaches the
// receiver once it is up: signed, with its idempotency key; an info event
// below --alert-min-severity is not sent.
func TestWebhookAcrossRestart(t *testing.T) {
	dir := t.TempDir()
	cert, pool := testServerTLS(t)
	addr := freeAddr(t)
	secret := []byte("0123456789abcdef0123456789abcdef")
	cfg := keysvc.AlertConfig{Webhooks: []string{"https://" + addr + "/hook?token=opaque"}, WebhookSecret: secret, CAs: pool}
	e := startEnvFunc(t, dir, func(c *keysvc.Config) { c.Alerts = cfg })
	v := openVM(t)
	sess := e.session(t, v, "hook-vm")
	alertEv := api.Event{Kind: "proc_mem", Severity: "critical", PID: 4242, Comm: "<svg/onload=1>", Overlap: true, Mode: "detect"}
	code, body := e.vm(t, "POST", "/v1/events", api.EventsRequest{Session: sess, Events: []api.Event{{Kind: "heartbeat", Severity: "info"}, alertEv}})
	if code != http.StatusOK {
		t.Fatalf("post events: %d %s", code, body)
	}
	waitFor(t, "failed delivery while the receiver is down", func() bool {
		return e.metric(t, `keysvc_alert_deliveries_total{result="error",sink="webhook-1"}`) >= 1
	})
	// The pending gauge is refreshed at the end of the dispatcher's round,
	// after the failed attempt is counted: wait for the round to end.
	waitFor(t, "the outbox gauge to show the undelivered alert", func() bool {
		return e.metric(t, "keysvc_alert_outbox_pending") == 1
	})
	e.stop(t)

	got := make(chan *http.Request, 8)
	bodies := make(chan []byte, 8)
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		got <- r
		bodies <- b
	}))
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	srv.Listener = ln
	srv.TLS = &tls.Config{Certificates: []tls.Certificate{cert}}
	srv.StartTLS()
	defer srv.Close()
	e2 := startEnvFunc(t, dir, func(c *keysvc.Config) { c.Alerts = cfg })

	var r *http.Request
	var b []byte
	select {
	case r = <-got:
		b = <-bodies
	case <-time.After(60 * time.Second):
		t.Fatal("the receiver got nothing within 60s of coming up")
	}
	var ab keysvc.AlertBody
	if err := json.Unmarshal(b, &ab); err != nil {
		t.Fatalf("body %s: %v", b, err)
	}
	switch {
	case r.Method != "POST" || r.URL.Path != "/hook" || r.Header.Get("Content-Type") != "application/json":
		t.Fatalf("request %s %s %s", r.Method, r.URL, r.Header.Get("Content-Type"))
	case !alert.Verify(secret, b, r.Header.Get(alert.SignatureHeader)):
		t.Fatalf("signature %q does not verify", r.Header.Get(alert.SignatureHeader))
	case alert.Verify([]byte("another secret, sixteen+"), b, r.Header.Get(alert.SignatureHeader)):
		t.Fatal("signature verifies under another secret")
	case ab.IdempotencyKey == "" || r.Header.Get(alert.IdempotencyHeader) != ab.IdempotencyKey:
		t.Fatalf("idempotency key %q in the header, %q in the body", r.Header.Get(alert.IdempotencyHeader), ab.IdempotencyKey)
	case ab.Event.Kind != "proc_mem" || ab.Event.Comm != alertEv.Comm || ab.Event.VM != "hook-vm" || ab.Event.PID != 4242:
		t.Fatalf("alert body %+v", ab)
	}
	if n, _ := strconv.Atoi(r.Header.Get(alert.AttemptHeader)); n < 2 {
		t.Fatalf("attempt %d: the tries while the receiver was down were not counted", n)
	}
	waitFor(t, "an empty outbox", func() bool { return e2.metric(t, "keysvc_alert_outbox_pending") == 0 })
	select {
	case r := <-got:
		if b := <-bodies; !bytes.Contains(b, []byte(`"proc_mem"`)) {
			t.Fatalf("the receiver got another alert: %s %s", r.URL, b)
		}
	default:
	}
}

// syslogFrame reads one octet-counted message.
func syslogFrame(r *bufio.Reader) (string, error) {
	n, err := r.ReadString(' ')
	if err != nil {
		return "", err
	}
	l, err := strconv.Atoi(strings.TrimSpace(n))
	if err != nil || l <= 0 || l > 64<<10 {
		return "", fmt.Errorf("bad octet count %q", n)
	}
	b := make([]byte, l)
	_, err = io.ReadFull(r, b)
	return string(b), err
}

var rfc5424 = regexp.MustCompile(`^<(\d{1,3})>1 (\S+) (\S+) keysvc (\d+) (\S+) (\[keygate@32473(?: [a-z_]+="(?:[^"\\\]]|\\["\\\]])*")*\]) \x{feff}(.*)$`)

// TestSyslog: alerts reach a real TCP and a real TLS listener as RFC 5424
// messages, octet-counted, with the event's fields as structured data
// (escaped) and the JSON body as the message.
func TestSyslog(t *testing.T) {
	cert, pool := testServerTLS(t)
	for _, tc := range []struct {
		scheme string
		listen func() (net.Listener, error)
	}{
		{"tcp", func() (net.Listener, error) { return net.Listen("tcp", "127.0.0.1:0") }},
		{"tls", func() (net.Listener, error) {
			return tls.Listen("tcp", "127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{cert}})
		}},
	} {
		t.Run(tc.scheme, func(t *testing.T) {
			ln, err := tc.listen()
			if err != nil {
				t.Fatal(err)
			}
			defer ln.Close()
			msgs := make(chan string, 8)
			go func() {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				defer c.Close()
				r := bufio.NewReader(c)
				for {
					m, err := syslogFrame(r)
					if err != nil {
						close(msgs)
						return
					}
					msgs <- m
				}
			}()
			e := startEnvFunc(t, t.TempDir(), func(c *keysvc.Config) {
				c.Alerts = keysvc.AlertConfig{Syslog: []string{tc.scheme + "://" + ln.Addr().String()}, CAs: pool}
			})
			v := openVM(t)
			sess := e.session(t, v, "log-vm")
			ev := api.Event{Kind: "ptrace_attach", Severity: "warning", PID: 77, Comm: `a"b]c\d`, Mode: "deny", Denied: true}
			if code, body := e.vm(t, "POST", "/v1/events", api.EventsRequest{Session: sess, Events: []api.Event{{Kind: "heartbeat", Severity: "info"}, ev}}); code != http.StatusOK {
				t.Fatalf("post: %d %s", code, body)
			}
			var m string
			select {
			case m = <-msgs:
			case <-time.After(60 * time.Second):
				t.Fatal("no syslog message within 60s")
			}
			p := rfc5424.FindStringSubmatch(m)
			if p == nil {
				t.Fatalf("not an RFC 5424 message of keysvc: %q", m)
			}
			if p[1] != "84" || p[5] != "ptrace_attach" { // authpriv (10) * 8 + warning (4)
				t.Fatalf("PRI %s MSGID %s, want 84 and ptrace_attach", p[1], p[5])
			}
			if _, err := time.Parse(time.RFC3339Nano, p[2]); err != nil {
				t.Fatalf("timestamp %q: %v", p[2], err)
			}
			if !strings.Contains(p[6], `comm="a\"b\]c\\d"`) || !strings.Contains(p[6], `vm="log-vm"`) || !strings.Contains(p[6], `denied="true"`) {
				t.Fatalf("structured data %s", p[6])
			}
			var ab keysvc.AlertBody
			if err := json.Unmarshal([]byte(p[7]), &ab); err != nil || ab.Event.Comm != ev.Comm || ab.Event.Kind != ev.Kind {
				t.Fatalf("message %q: %v", p[7], err)
			}
			select {
			case m, ok := <-msgs:
				if ok {
					t.Fatalf("a second message (the heartbeat is below the minimum severity): %q", m)
				}
			case <-time.After(200 * time.Millisecond):
			}
		})
	}
}
