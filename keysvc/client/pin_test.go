package client

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"math/big"
	"net"
	"net/http"
	"testing"
	"time"

	"github.com/keygate/keygate/keysvc/api"
)

// issue makes a CA and a server certificate for 127.0.0.1 signed by it.
func issue(t *testing.T) (ca *x509.Certificate, leaf tls.Certificate) {
	t.Helper()
	caKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	caTmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test ca"}, NotBefore: time.Now().Add(-time.Hour),
		NotAfter: time.Now().Add(time.Hour), IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	ca, _ = x509.ParseCertificate(caDER)
	k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "keysvc"}, NotBefore: time.Now().Add(-time.Hour),
		NotAfter: time.Now().Add(time.Hour), KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1")}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &k.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	return ca, tls.Certificate{Certificate: [][]byte{der}, PrivateKey: k}
}

func fingerprint(c *x509.Certificate) string {
	s := sha256.Sum256(c.Raw)
	return hex.EncodeToString(s[:])
}

// TestPinnedCA: with only the token's CA fingerprint, the client accepts a
// server whose chain carries that CA and whose leaf it signed, and nothing
// else; the same holds for a connection warm dialed ahead of the request,
// which the request then uses instead of dialing again.
func TestPinnedCA(t *testing.T) {
	ca, leaf := issue(t)
	otherCA, otherLeaf := issue(t)
	withCA := tls.Certificate{Certificate: [][]byte{leaf.Certificate[0], ca.Raw}, PrivateKey: leaf.PrivateKey}
	// A leaf from another CA, sent with the pinned CA appended: the chain
	// "has" the pinned CA, but it did not sign the leaf.
	forged := tls.Certificate{Certificate: [][]byte{otherLeaf.Certificate[0], ca.Raw}, PrivateKey: otherLeaf.PrivateKey}
	for _, tc := range []struct {
		name    string
		serve   tls.Certificate
		pin     string
		wantErr error
	}{
		{"chain-with-pinned-ca", withCA, fingerprint(ca), nil},
		{"leaf-only", leaf, fingerprint(ca), ErrTLS},
		{"other-ca-pinned", withCA, fingerprint(otherCA), ErrTLS},
		{"leaf-not-signed-by-pinned-ca", forged, fingerprint(ca), ErrTLS},
	} {
		for _, mode := range []string{"cold", "warm", "stale"} {
			warm, stale := mode != "cold", mode == "stale"
			t.Run(tc.name+"/"+mode, func(t *testing.T) {
				if stale {
					// A warm connection older than warmMaxAge is dropped
					// for a fresh one.
					defer func(d time.Duration) { warmMaxAge = d }(warmMaxAge)
					warmMaxAge = 0
				}
				ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{tc.serve}, MinVersion: tls.VersionTLS13})
				if err != nil {
					t.Fatal(err)
				}
				conns := make(chan struct{}, 16)
				srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
					w.Write([]byte(`{"state":"active"}`))
				}), ConnState: func(_ net.Conn, st http.ConnState) {
					if st == http.StateNew {
						conns <- struct{}{}
					}
				}}
				go srv.Serve(ln)
				defer srv.Close()
				cl, err := New(Config{URLs: []string{"https://" + ln.Addr().String()}, CAPin: tc.pin})
				if err != nil {
					t.Fatal(err)
				}
				defer cl.Close()
				if warm {
					cl.Warm()
					<-conns // the warm dial reached the server before any request
				}
				for i := range 2 {
					var sr api.SessionResponse
					err = cl.Do(context.Background(), "GET", "/v1/session", "tok", nil, &sr)
					if tc.wantErr == nil {
						if err != nil || sr.State != api.StateActive {
							t.Fatalf("do %d: %v %+v", i, err, sr)
						}
						continue
					}
					if !errors.Is(err, tc.wantErr) {
						t.Fatalf("do %d: %v, want %v", i, err, tc.wantErr)
					}
				}
				if tc.wantErr != nil {
					return
				}
				srv.Close()
				want := 1 // the requests share one connection: the warm one if it is fresh
				if warm && !stale {
					want = 0
				}
				if n := len(conns); n != want {
					t.Fatalf("requests opened %d connection(s) besides any warm one; want %d", n, want)
				}
			})
		}
	}
}

// TestNewClientRefuses: what the client refuses before any connection.
func TestNewClientRefuses(t *testing.T) {
	ca, _ := issue(t)
	caPEM := []byte("-----BEGIN CERTIFICATE-----\n" + "\n-----END CERTIFICATE-----\n")
	other, _ := issue(t)
	otherPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: other.Raw})
	for _, tc := range []struct {
		name string
		urls []string
		pin  string
		ca   []byte
	}{
		{"http", []string{"http://127.0.0.1:1"}, fingerprint(ca), nil},
		{"no-url", nil, fingerprint(ca), nil},
		{"http-replica", []string{"https://127.0.0.1:1", "http://127.0.0.1:2"}, fingerprint(ca), nil},
		{"listed-twice", []string{"https://127.0.0.1:1", "https://127.0.0.1:1/"}, fingerprint(ca), nil},
		{"query", []string{"https://127.0.0.1:1?x=1"}, fingerprint(ca), nil},
		{"no-trust-anchor", []string{"https://127.0.0.1:1"}, "", nil},
		{"bad-ca-file", []string{"https://127.0.0.1:1"}, "", caPEM},
		{"ca-not-the-pinned-one", []string{"https://127.0.0.1:1"}, fingerprint(ca), otherPEM},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := New(Config{URLs: tc.urls, CA: tc.ca, CAPin: tc.pin}); err == nil {
				t.Fatal("accepted")
			}
		})
	}
}
