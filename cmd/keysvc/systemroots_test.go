package main

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// TestAdminNeverTrustsSystemRoots runs an admin command against a server
// whose certificate the system's roots trust (SSL_CERT_FILE names it) but
// that the key service's CA did not sign: a TLS-inspecting proxy, or a
// host with a public certificate for the admin name. Without --ca the
// command must refuse before connecting; with another CA it must fail the
// handshake. The admin token must reach the server in neither case.
func TestAdminNeverTrustsSystemRoots(t *testing.T) {
	var tokens atomic.Int32
	srv := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Authorization") != "" {
			tokens.Add(1)
		}
		w.Write([]byte("[]"))
	}))
	defer srv.Close()
	dir := t.TempDir()
	roots := filepath.Join(dir, "roots.pem")
	if err := os.WriteFile(roots, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: srv.Certificate().Raw}), 0o644); err != nil {
		t.Fatal(err)
	}
	t.Setenv("SSL_CERT_FILE", roots) // the system's roots now trust srv
	tok := filepath.Join(dir, "admin.token")
	if err := os.WriteFile(tok, []byte("0123456789abcdef0123456789abcdef\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	otherCA := filepath.Join(dir, "other-ca.pem")
	writeSelfSignedCA(t, otherCA)
	t.Setenv("KEYSVC_CA", "")

	for _, tc := range []struct {
		name string
		args []string
		want string
	}{
		{"no CA", []string{"vm", "list", "--server", srv.URL, "--token-file", tok}, "no CA to trust: pass --ca"},
		{"another CA", []string{"vm", "list", "--server", srv.URL, "--token-file", tok, "--ca", otherCA}, "--ca"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var out, errb bytes.Buffer
			if code := run(tc.args, strings.NewReader(""), &out, &errb); code == 0 {
				t.Fatalf("exit 0 (stdout %q), want a refusal", out.String())
			}
			if !strings.Contains(errb.String(), tc.want) {
				t.Errorf("stderr %q, want it to contain %q", errb.String(), tc.want)
			}
			if n := tokens.Load(); n != 0 {
				t.Fatalf("the admin token reached a server the key service's CA did not sign (%d requests)", n)
			}
		})
	}
}

// writeSelfSignedCA writes a fresh CA certificate, PEM, to path.
func writeSelfSignedCA(t *testing.T, path string) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "not the key service's CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644); err != nil {
		t.Fatal(err)
	}
}
