package client

import (
	"crypto/sha256"
	"crypto/subtle"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"strings"
)

// CAFingerprint returns the lowercase hex SHA-256 of the first certificate
// (DER) in caPEM, as a keygate token stores it.
func CAFingerprint(caPEM []byte) (string, error) {
	cert, err := ParseCA(caPEM)
	if err != nil {
		return "", err
	}
	sum := sha256.Sum256(cert.Raw)
	return hex.EncodeToString(sum[:]), nil
}

// ParseCA returns the first certificate of a PEM file.
func ParseCA(caPEM []byte) (*x509.Certificate, error) {
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

// tlsConfig is the TLS configuration for one replica at host. With a CA
// the server must chain to it (and when pin is also set the CA must have
// that fingerprint); with only a pin the CA is taken from the server's
// chain, but only the one of that fingerprint, and it must sign the leaf;
// neither is an error: the system's roots are never trusted.
func tlsConfig(ca *x509.Certificate, pin, host string) (*tls.Config, error) {
	conf := &tls.Config{MinVersion: tls.VersionTLS13}
	switch {
	case ca != nil:
		pool := x509.NewCertPool()
		pool.AddCert(ca)
		conf.RootCAs = pool
	case pin != "":
		// Go's verifier needs the CA itself: take it from the chain the
		// server sends, but only the one whose hash is pinned.
		conf.InsecureSkipVerify = true
		conf.VerifyConnection = func(cs tls.ConnectionState) error { return verifyPinned(cs, host, pin) }
	default:
		return nil, errors.New("no CA to trust: give the key service's CA certificate (DATA/ca.pem) or its SHA-256")
	}
	// The transport dials through the replica's own dialer (so that a
	// connection warm made can be handed over), so ALPN is asked for here.
	conf.NextProtos = []string{"h2", "http/1.1"}
	return conf, nil
}

// checkPin fails when ca is not the CA that pin names.
func checkPin(ca *x509.Certificate, pin string) error {
	sum := sha256.Sum256(ca.Raw)
	if subtle.ConstantTimeCompare([]byte(hex.EncodeToString(sum[:])), []byte(strings.ToLower(pin))) != 1 {
		return &PinMismatchError{Got: hex.EncodeToString(sum[:]), Pin: pin}
	}
	return nil
}

// PinMismatchError: the CA certificate given is not the one pinned.
type PinMismatchError struct{ Got, Pin string }

func (e *PinMismatchError) Error() string {
	return fmt.Sprintf("the CA certificate (sha256 %s) is not the pinned CA (%s)", e.Got, e.Pin)
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
		return fmt.Errorf("%w: the server's chain holds no CA with the pinned sha256 %s (give the key service's DATA/ca.pem)", ErrTLS, pin)
	}
	_, err := cs.PeerCertificates[0].Verify(x509.VerifyOptions{Roots: roots, DNSName: host})
	if err != nil {
		return fmt.Errorf("%w: %v", ErrTLS, err)
	}
	return nil
}

// isTrustFailure reports whether err is the server's certificate failing
// verification (as opposed to a handshake that did not finish).
func isTrustFailure(err error) bool {
	var ua x509.UnknownAuthorityError
	var hn x509.HostnameError
	var ci x509.CertificateInvalidError
	var tv *tls.CertificateVerificationError
	return errors.Is(err, ErrTLS) || errors.As(err, &ua) || errors.As(err, &hn) || errors.As(err, &ci) || errors.As(err, &tv)
}
