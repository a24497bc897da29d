package keysvc_test

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/pem"
	"math/big"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/keygate/keygate/keysvc"
	"github.com/keygate/keygate/keysvc/api"
	"github.com/keygate/keygate/tpm"
)

// ekCA is a stand-in TPM manufacturer CA.
type ekCA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
}

func newEKCA(t testing.TB) *ekCA {
	t.Helper()
	k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "TPM EK CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, k.Public(), k)
	if err != nil {
		t.Fatal(err)
	}
	c, _ := x509.ParseCertificate(der)
	return &ekCA{cert: c, key: k}
}

// issue makes an EK certificate for pub the way TPM vendors do: empty
// subject, and a critical subjectAltName holding only a directoryName with
// the TPM's manufacturer, model and version.
func (ca *ekCA) issue(t testing.TB, pub crypto.PublicKey) string {
	t.Helper()
	dn, _ := asn1.Marshal(pkix.Name{ExtraNames: []pkix.AttributeTypeAndValue{
		{Type: asn1.ObjectIdentifier{2, 23, 133, 2, 1}, Value: "id:53494D55"},
		{Type: asn1.ObjectIdentifier{2, 23, 133, 2, 2}, Value: "SIMULATOR"},
		{Type: asn1.ObjectIdentifier{2, 23, 133, 2, 3}, Value: "id:00010002"},
	}}.ToRDNSequence())
	san, _ := asn1.Marshal([]asn1.RawValue{{Class: asn1.ClassContextSpecific, Tag: 4, IsCompound: true, Bytes: dn}})
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(2), NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		KeyUsage:        x509.KeyUsageKeyAgreement,
		ExtraExtensions: []pkix.Extension{{Id: asn1.ObjectIdentifier{2, 5, 29, 17}, Critical: true, Value: san}}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, pub, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	return string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}))
}

func TestEnrollByEKCert(t *testing.T) {
	ca, other := newEKCA(t), newEKCA(t)
	roots := x509.NewCertPool()
	roots.AddCert(ca.cert)
	e := startEnv(t, t.TempDir(), keysvc.WithEKRoots(roots))
	v := openVM(t)
	ek, err := v.tpm.EK(tpm.ECC)
	if err != nil {
		t.Fatal(err)
	}
	good := ca.issue(t, ek.Key)

	e.admin(t, "POST", "/v1/admin/vms", api.EnrollRequest{Name: "certified", EKCert: good, AKPub: v.akPEM}, http.StatusCreated)
	e.admin(t, "POST", "/v1/admin/volumes", api.VolumeRequest{ID: "certified-vol", VM: "certified", Key: ukBytes}, http.StatusCreated)
	e.admin(t, "PUT", "/v1/admin/vms/certified/policy", v.pcrPolicy(t, 7), http.StatusOK)
	if code, body := e.unlock(t, v, "certified", "certified-vol"); code != http.StatusOK {
		t.Fatalf("unlock of a VM enrolled by EK certificate: %d %s", code, body)
	}

	for _, tc := range []struct {
		name string
		req  api.EnrollRequest
		want string
	}{
		{"other-ca", api.EnrollRequest{Name: "x1", EKCert: other.issue(t, ek.Key)}, "does not chain"},
		{"pub-mismatch", api.EnrollRequest{Name: "x2", EKCert: good, EKPub: randomPEM(t)}, "not the key of ek_cert"},
		{"not-pem", api.EnrollRequest{Name: "x3", EKCert: "hello"}, "not PEM certificates"},
		{"neither", api.EnrollRequest{Name: "x4"}, "ek_pub or ek_cert is required"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if b := e.admin(t, "POST", "/v1/admin/vms", tc.req, http.StatusBadRequest); !strings.Contains(string(b), tc.want) {
				t.Fatalf("answer %s does not say %q", b, tc.want)
			}
		})
	}

	// A service without EK roots refuses certificates and says what to do.
	plain := startEnv(t, t.TempDir())
	if b := plain.admin(t, "POST", "/v1/admin/vms", api.EnrollRequest{Name: "c", EKCert: good}, http.StatusBadRequest); !strings.Contains(string(b), "--ek-roots") {
		t.Fatalf("answer %s does not name --ek-roots", b)
	}
}
