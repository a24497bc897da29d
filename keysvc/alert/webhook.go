package alert

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"time"
)

// Headers a webhook request carries.
const (
	SignatureHeader   = "X-Keygate-Signature" // "sha256=" and the hex HMAC-SHA256 of the body under the secret
	IdempotencyHeader = "Idempotency-Key"     // the same on every retry of one alert
	AttemptHeader     = "X-Keygate-Attempt"   // 1 for the first try
	EventHeader       = "X-Keygate-Event-Id"
)

// Webhook POSTs each alert as JSON to a URL.
type Webhook struct {
	url    string
	label  string
	secret []byte
	hc     *http.Client
}

// NewWebhook returns the n-th webhook sink (n names it in metrics). secret
// keys the signature; roots, if not nil, are the CAs its HTTPS server is
// checked against (the system's otherwise).
func NewWebhook(n int, rawURL string, secret []byte, roots *x509.CertPool) (*Webhook, error) {
	u, err := url.Parse(rawURL)
	if err != nil || u.Host == "" || (u.Scheme != "https" && u.Scheme != "http") {
		return nil, fmt.Errorf("alert webhook %q is not an http(s) URL", redact(rawURL))
	}
	if len(secret) == 0 {
		return nil, fmt.Errorf("alert webhook %s has no secret to sign with", redact(rawURL))
	}
	tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: roots, MinVersion: tls.VersionTLS12}, Proxy: http.ProxyFromEnvironment,
		MaxIdleConnsPerHost: 2, IdleConnTimeout: time.Minute}
	return &Webhook{url: rawURL, label: "webhook-" + strconv.Itoa(n), secret: bytes.Clone(secret),
		hc: &http.Client{Transport: tr, Timeout: 20 * time.Second,
			CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}}, nil
}

// redact drops what a URL may carry as a secret (user info, query).
func redact(raw string) string {
	u, err := url.Parse(raw)
	if err != nil {
		return "(unparsable URL)"
	}
	u.User, u.RawQuery, u.Fragment = nil, "", ""
	return u.String()
}

// ID implements Sink: a hash, since a URL may hold a token.
func (w *Webhook) ID() string {
	h := sha256.Sum256([]byte(w.url))
	return "webhook:" + hex.EncodeToString(h[:12])
}

// Label implements Sink.
func (w *Webhook) Label() string { return w.label }

// Sign is the X-Keygate-Signature value of body under secret.
func Sign(secret, body []byte) string {
	m := hmac.New(sha256.New, secret)
	m.Write(body)
	return "sha256=" + hex.EncodeToString(m.Sum(nil))
}

// Verify checks a X-Keygate-Signature value in constant time: what a
// receiver runs.
func Verify(secret, body []byte, sig string) bool {
	return hmac.Equal([]byte(Sign(secret, body)), []byte(sig))
}

// Deliver implements Sink: any 2xx answer is delivery.
func (w *Webhook) Deliver(ctx context.Context, d Delivery) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, w.url, bytes.NewReader(d.Body))
	if err != nil {
		return fmt.Errorf("%s: %v", w.label, err)
	}
	h := req.Header
	h.Set("Content-Type", "application/json")
	h.Set("User-Agent", "keygate-keysvc")
	h.Set(SignatureHeader, Sign(w.secret, d.Body))
	h.Set(IdempotencyHeader, d.Key)
	h.Set(AttemptHeader, strconv.Itoa(d.Attempt))
	h.Set(EventHeader, strconv.FormatInt(d.EventID, 10))
	resp, err := w.hc.Do(req)
	if err != nil {
		return fmt.Errorf("%s (%s): %w", w.label, redact(w.url), unwrapURLError(err))
	}
	io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
	resp.Body.Close()
	if resp.StatusCode/100 != 2 {
		return fmt.Errorf("%s (%s) answered %s", w.label, redact(w.url), resp.Status)
	}
	return nil
}

// unwrapURLError drops *url.Error's copy of the URL, which may hold a token.
func unwrapURLError(err error) error {
	if ue, ok := err.(*url.Error); ok {
		return ue.Err
	}
	return err
}

// Close implements Sink.
func (w *Webhook) Close() error {
	w.hc.CloseIdleConnections()
	clear(w.secret)
	return nil
}
