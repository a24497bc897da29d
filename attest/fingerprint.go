package attest

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"errors"
	"fmt"
	"sync"
)

// KeyFingerprint returns the SHA-256 of pub's PKIX (DER) encoding: the way
// tokens and the key service name EK and AK public keys.
//
// For an ECDSA key on P-256, P-384 or P-521 it hashes the same bytes
// without building them through encoding/asn1: the PKIX encoding of such a
// key is a fixed per-curve prefix followed by the uncompressed point. An
// unlock fingerprints four keys, and the ASN.1 route was a visible share of
// its CPU.
func KeyFingerprint(pub crypto.PublicKey) ([sha256.Size]byte, error) {
	if pub == nil {
		return [sha256.Size]byte{}, errors.New("fingerprint public key: key is nil")
	}
	if k, ok := pub.(*ecdsa.PublicKey); ok {
		if k == nil {
			return [sha256.Size]byte{}, errors.New("fingerprint public key: key is nil")
		}
		if prefix := pkixPrefix(k.Curve); prefix != nil {
			if point, err := k.Bytes(); err == nil {
				h := sha256.New()
				h.Write(prefix)
				h.Write(point)
				var fp [sha256.Size]byte
				h.Sum(fp[:0])
				return fp, nil
			}
		}
	}
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return [sha256.Size]byte{}, fmt.Errorf("fingerprint public key: %w", err)
	}
	return sha256.Sum256(der), nil
}

// pkixPrefixes holds, per curve, the bytes x509.MarshalPKIXPublicKey puts
// before the uncompressed point; they are taken from x509 itself, once.
var pkixPrefixes = sync.OnceValue(func() map[elliptic.Curve][]byte {
	m := make(map[elliptic.Curve][]byte)
	for _, c := range []elliptic.Curve{elliptic.P256(), elliptic.P384(), elliptic.P521()} {
		k, err := ecdsa.GenerateKey(c, rand.Reader)
		if err != nil {
			continue
		}
		der, err1 := x509.MarshalPKIXPublicKey(&k.PublicKey)
		point, err2 := k.PublicKey.Bytes()
		if err1 != nil || err2 != nil || !bytes.HasSuffix(der, point) {
			continue // fall back to x509 for this curve
		}
		m[c] = der[:len(der)-len(point)]
	}
	return m
})

func pkixPrefix(c elliptic.Curve) []byte {
	switch c {
	case elliptic.P256(), elliptic.P384(), elliptic.P521():
		return pkixPrefixes()[c]
	}
	return nil
}
