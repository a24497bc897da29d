package keysvc_test

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"math/big"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/keygate/keygate/keysvc"
	"github.com/keygate/keygate/keysvc/audit"
	"github.com/keygate/keygate/keysvc/dashboard"
)

// testCA makes a CA and issues certificates under it.
type testCA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
}

func newTestCA(t *testing.T, name string) *testCA {
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: name}, NotBefore: time.Now().Add(-time.Hour),
		NotAfter: time.Now().Add(time.Hour), IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	c, _ := x509.ParseCertificate(der)
	return &testCA{cert: c, key: key}
}

func (ca *testCA) issue(t *testing.T, cn string, usage x509.ExtKeyUsage) tls.Certificate {
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: cn}, NotBefore: time.Now().Add(-time.Hour),
		NotAfter: time.Now().Add(time.Hour), KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{usage}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

// withCert is e's client presenting cert.
func (e *env) withCert(t *testing.T, cert tls.Certificate) *http.Client {
	caPEM, _ := os.ReadFile(filepath.Join(e.dir, keysvc.CAFile))
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(caPEM)
	// Sent whatever CAs the server names, as a client that insists would.
	send := func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &cert, nil }
	tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool, GetClientCertificate: send, MinVersion: tls.VersionTLS13}}
	t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: tr, Timeout: 30 * time.Second,
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
}

// TestAdminClientCert: a client certificate under the admin client CAs
// works like the token on the admin API and logs in to the dashboard; one
// under another CA, or without the client-auth usage, is refused in the
// handshake; without one the token still works.
func TestAdminClientCert(t *testing.T) {
	ca, other := newTestCA(t, "admins"), newTestCA(t, "strangers")
	pool := x509.NewCertPool()
	pool.AddCert(ca.cert)
	e := startEnvWith(t, t.TempDir(), func(c *keysvc.Config) { c.AdminClientCAs = pool })
	v := openVM(t)
	setup(t, e, v, "mtls-vm")
	base := "https://" + e.svc.AdminAddr()
	alice := e.withCert(t, ca.issue(t, "alice", x509.ExtKeyUsageClientAuth))

	resp, err := alice.Get(base + "/v1/admin/vms")
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("admin API with alice's certificate: %v %v", err, resp)
	}
	resp.Body.Close()
	for name, cert := range map[string]tls.Certificate{
		"another CA":       other.issue(t, "mallory", x509.ExtKeyUsageClientAuth),
		"server-auth only": ca.issue(t, "server", x509.ExtKeyUsageServerAuth),
	} {
		if resp, err := e.withCert(t, cert).Get(base + "/v1/admin/vms"); err == nil {
			resp.Body.Close()
			t.Fatalf("%s: the admin API answered %d; want the handshake refused", name, resp.StatusCode)
		}
	}
	if code, _ := e.do(t, "GET", base+"/v1/admin/vms", "", nil); code != http.StatusUnauthorized {
		t.Fatalf("no certificate, no token: %d", code)
	}
	e.admin(t, "GET", "/v1/admin/vms", nil, http.StatusOK) // the token alone still works

	// The dashboard offers, and takes, the certificate at login.
	req, _ := http.NewRequest("GET", base+"/ui/login", nil)
	resp, err = alice.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	form := url.Values{"cert": {"1"}}
	req, _ = http.NewRequest("POST", base+"/ui/login", strings.NewReader(form.Encode()))
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	req.Header.Set("Origin", base)
	resp, err = alice.Do(req)
	if err != nil || resp.StatusCode != http.StatusSeeOther || len(resp.Cookies()) == 0 || resp.Cookies()[0].Name != dashboard.CookieName {
		t.Fatalf("dashboard login with alice's certificate: %v %v", err, resp)
	}
	resp.Body.Close()
	// Without a certificate, cert=1 alone logs nobody in.
	u := &ui{t: t, e: e}
	if resp := u.form("/ui/login", form, u.origin(), "same-origin"); resp.StatusCode != http.StatusUnauthorized {
		t.Fatalf("cert=1 without a certificate: %d", resp.StatusCode)
	}

	var recs []audit.Record
	json.Unmarshal(e.admin(t, "GET", "/v1/admin/audit", nil, http.StatusOK), &recs)
	var api, login bool
	for _, r := range recs {
		var d audit.Admin
		json.Unmarshal(r.Details, &d)
		api = api || d.Client == "cert:CN=alice"
		login = login || (strings.HasPrefix(r.Actor, "ui:") && strings.HasSuffix(r.Actor, ":cert:CN=alice"))
	}
	if !api || !login {
		t.Fatalf("audit chain: API call by cert:CN=alice %v, dashboard login by its session %v", api, login)
	}
}
