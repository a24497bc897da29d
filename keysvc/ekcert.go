package keysvc

import (
	"crypto/x509"
	"encoding/asn1"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"slices"
	"strings"
	"time"
)

// oidSubjectAltName is the X.509 subjectAltName extension. TPM EK
// certificates carry the TPM's manufacturer, model and version as a
// directoryName there, and mark it critical (TCG EK Credential Profile
// 2.0, 3.2.9); Go does not interpret directoryName alternative names and
// would refuse the certificate for it.
var oidSubjectAltName = asn1.ObjectIdentifier{2, 5, 29, 17}

// LoadEKRoots reads PEM CA certificates (a TPM manufacturer's or a cloud's
// EK CAs, roots and intermediates) for WithEKRoots.
func LoadEKRoots(path string) (*x509.CertPool, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read EK roots: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(b) {
		return nil, fmt.Errorf("EK roots %s hold no PEM certificate", path)
	}
	return pool, nil
}

// WithEKRoots sets the CAs that EK certificates given at enrollment
// (EnrollRequest.EKCert) must chain to. Without it, enrollment by EK
// certificate is refused and only EK public keys are accepted.
func WithEKRoots(roots *x509.CertPool) Option { return func(s *Server) { s.ekRoots = roots } }

// verifyEKCert parses a PEM EK certificate (with any intermediates after
// it) and checks it chains to roots at now. Only the directoryName-only
// subjectAltName that EK certificates mark critical is tolerated among
// unhandled critical extensions; the extended key usage is not checked,
// since EK certificates name the TCG's, not a TLS one.
func verifyEKCert(pemText string, roots *x509.CertPool, now time.Time) (*x509.Certificate, error) {
	if roots == nil {
		return nil, errors.New("this key service has no EK roots: start it with --ek-roots FILE, or enroll with ek_pub")
	}
	var certs []*x509.Certificate
	rest := []byte(pemText)
	for {
		var blk *pem.Block
		blk, rest = pem.Decode(rest)
		if blk == nil {
			break
		}
		if blk.Type != "CERTIFICATE" {
			return nil, fmt.Errorf("ek_cert holds a PEM %q block; want CERTIFICATE blocks", blk.Type)
		}
		c, err := x509.ParseCertificate(blk.Bytes)
		if err != nil {
			return nil, fmt.Errorf("ek_cert: parse certificate: %v", err)
		}
		certs = append(certs, c)
	}
	if len(certs) == 0 || strings.TrimSpace(string(rest)) != "" {
		return nil, errors.New("ek_cert is not PEM certificates (print it with `keygate tpm ek`, which shows the TPM's EK certificate when it has one)")
	}
	leaf := certs[0]
	inter := x509.NewCertPool()
	for _, c := range certs[1:] {
		inter.AddCert(c)
	}
	leaf.UnhandledCriticalExtensions = slices.DeleteFunc(slices.Clone(leaf.UnhandledCriticalExtensions),
		func(o asn1.ObjectIdentifier) bool { return o.Equal(oidSubjectAltName) })
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, CurrentTime: now,
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		return nil, fmt.Errorf("ek_cert does not chain to the EK roots: %v", err)
	}
	return leaf, nil
}
