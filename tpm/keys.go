package tpm

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/asn1"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"strings"

	"github.com/google/go-tpm-tools/client"
	"github.com/google/go-tpm/legacy/tpm2"
	"github.com/google/go-tpm/tpmutil"
)

// Alg selects the key algorithm of the EK and AK.
type Alg int

const (
	// ECC is NIST P-256, the default: the TCG default EK and AK templates.
	ECC Alg = iota
	// RSA is RSA-2048, for TPMs and clouds that enroll RSA keys.
	RSA
)

func (a Alg) String() string {
	switch a {
	case ECC:
		return "ecc"
	case RSA:
		return "rsa"
	}
	return fmt.Sprintf("Alg(%d)", int(a))
}

// ParseAlg parses "ecc" (also "ec", "p256", "") or "rsa".
func ParseAlg(s string) (Alg, error) {
	switch strings.ToLower(strings.TrimSpace(s)) {
	case "", "ecc", "ec", "p256", "p-256":
		return ECC, nil
	case "rsa", "rsa2048":
		return RSA, nil
	}
	return 0, fmt.Errorf("unknown key algorithm %q: use ecc or rsa", s)
}

// PublicKey is the public half of a TPM key, as enrollment needs it.
type PublicKey struct {
	// Alg is the key's algorithm.
	Alg Alg
	// Key is an *ecdsa.PublicKey or *rsa.PublicKey.
	Key crypto.PublicKey
	// Cert is the key's certificate from the TPM's NV storage: the
	// manufacturer's (or cloud's) EK certificate, or a GCE AK certificate.
	// It is nil when the TPM holds none (swtpm without swtpm_setup
	// certificates, the simulator).
	Cert *x509.Certificate
}

// PEM returns the key as a PEM "PUBLIC KEY" block (PKIX, as openssl writes).
func (k *PublicKey) PEM() ([]byte, error) { return MarshalPublicKeyPEM(k.Key) }

// Fingerprint returns the hex SHA-256 of the key's PKIX DER encoding, a short
// name for the key in logs and enrollment records.
func (k *PublicKey) Fingerprint() (string, error) { return Fingerprint(k.Key) }

// MarshalPublicKeyPEM encodes an ECDSA or RSA public key as a PEM "PUBLIC
// KEY" block.
func MarshalPublicKeyPEM(pub crypto.PublicKey) ([]byte, error) {
	switch pub.(type) {
	case *ecdsa.PublicKey, *rsa.PublicKey:
	default:
		return nil, fmt.Errorf("marshal public key: unsupported type %T (want an ECDSA or RSA key)", pub)
	}
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return nil, fmt.Errorf("marshal public key: %w", err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}), nil
}

// ParsePublicKeyPEM decodes the first PEM block of data: a "PUBLIC KEY"
// (PKIX) block, or a "CERTIFICATE" whose public key is returned. It accepts
// what `keygate tpm ek` and `keygate tpm ak` print, and an EK certificate.
func ParsePublicKeyPEM(data []byte) (crypto.PublicKey, error) {
	block, _ := pem.Decode(data)
	if block == nil {
		return nil, errors.New("parse public key: no PEM block found (want the output of 'keygate tpm ek' or a PEM certificate)")
	}
	var pub crypto.PublicKey
	switch block.Type {
	case "PUBLIC KEY":
		var err error
		if pub, err = x509.ParsePKIXPublicKey(block.Bytes); err != nil {
			return nil, fmt.Errorf("parse public key: %v", err)
		}
	case "CERTIFICATE":
		cert, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			return nil, fmt.Errorf("parse public key from certificate: %v", err)
		}
		pub = cert.PublicKey
	default:
		return nil, fmt.Errorf("parse public key: PEM block is %q, want \"PUBLIC KEY\" or \"CERTIFICATE\"", block.Type)
	}
	switch pub.(type) {
	case *ecdsa.PublicKey, *rsa.PublicKey:
		return pub, nil
	}
	return nil, fmt.Errorf("parse public key: unsupported key type %T (want ECDSA or RSA)", pub)
}

// Fingerprint returns the hex SHA-256 of pub's PKIX DER encoding.
func Fingerprint(pub crypto.PublicKey) (string, error) {
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return "", fmt.Errorf("fingerprint public key: %w", err)
	}
	sum := sha256.Sum256(der)
	return hex.EncodeToString(sum[:]), nil
}

// loadEK loads the EK made from the TCG default template for alg, with its
// certificate from NV when there is one. The caller holds t.mu and must
// Close the key.
func (t *TPM) loadEK(alg Alg) (*client.Key, error) {
	var k *client.Key
	var err error
	switch alg {
	case ECC:
		k, err = t.loadKey(tpm2.HandleEndorsement, client.DefaultEKTemplateECC(), client.EKECCReservedHandle, client.EKCertNVIndexECC)
	case RSA:
		k, err = t.loadKey(tpm2.HandleEndorsement, client.DefaultEKTemplateRSA(), client.EKReservedHandle, client.EKCertNVIndexRSA)
	default:
		return nil, fmt.Errorf("load EK: unknown algorithm %v: use ECC or RSA", alg)
	}
	if err != nil {
		return nil, fmt.Errorf("load %s EK: %w", alg, err)
	}
	return k, nil
}

// loadAK loads the AK for alg: on a GCE shielded VM (whose vTPM holds an AK
// template in NV) the GCE AK, which comes with a Google-signed certificate;
// elsewhere the TCG default AK template in the owner hierarchy. The caller
// holds t.mu and must Close the key.
func (t *TPM) loadAK(alg Alg) (*client.Key, error) {
	var k *client.Key
	var err error
	switch alg {
	case ECC:
		if k, err = t.gceAK(client.GceAKTemplateNVIndexECC, client.GceAKCertNVIndexECC); k == nil && err == nil {
			k, err = t.loadKey(tpm2.HandleOwner, client.AKTemplateECC(), client.DefaultAKECCHandle, 0)
		}
	case RSA:
		if k, err = t.gceAK(client.GceAKTemplateNVIndexRSA, client.GceAKCertNVIndexRSA); k == nil && err == nil {
			k, err = t.loadKey(tpm2.HandleOwner, client.AKTemplateRSA(), client.DefaultAKRSAHandle, 0)
		}
	default:
		return nil, fmt.Errorf("load AK: unknown algorithm %v: use ECC or RSA", alg)
	}
	if err != nil {
		return nil, fmt.Errorf("load %s AK: %w", alg, err)
	}
	return k, nil
}

// loadKey uses the key persisted at cached when it matches template (as
// cloud vTPMs and go-tpm-tools persist EKs and AKs), and otherwise creates
// a transient primary key from template in hierarchy; Close flushes it.
//
// Unlike client.EndorsementKeyECC and friends, it never persists a key or
// evicts one that is there: the TPM's NV is left as it was found.
func (t *TPM) loadKey(hierarchy tpmutil.Handle, template tpm2.Public, cached tpmutil.Handle, certIndex uint32) (*client.Key, error) {
	var k *client.Key
	var err error
	if pub, _, _, rerr := tpm2.ReadPublic(t.rw, cached); rerr == nil && pub.MatchesTemplate(template) {
		k, err = client.LoadCachedKey(t.rw, cached, nil)
	} else {
		k, err = client.NewKey(t.rw, hierarchy, template)
	}
	if err != nil {
		return nil, err
	}
	if certIndex != 0 {
		if cert := t.nvCert(certIndex); cert != nil {
			_ = k.SetCert(cert) // refuses a certificate for another key
		}
	}
	return k, nil
}

// gceAK creates the GCE AK from the template GCE keeps at templateIndex,
// with its certificate. It returns nil, nil when there is no such template
// (not a GCE vTPM).
func (t *TPM) gceAK(templateIndex, certIndex uint32) (*client.Key, error) {
	data, err := tpm2.NVReadEx(t.rw, tpmutil.Handle(templateIndex), tpm2.HandleOwner, "", 0)
	if err != nil {
		return nil, nil
	}
	template, err := tpm2.DecodePublic(data)
	if err != nil {
		return nil, fmt.Errorf("GCE AK template at NV index %#x: %w", templateIndex, err)
	}
	k, err := client.NewKey(t.rw, tpm2.HandleEndorsement, template)
	if err != nil {
		return nil, fmt.Errorf("create GCE AK from NV index %#x: %w", templateIndex, err)
	}
	if cert := t.nvCert(certIndex); cert != nil {
		_ = k.SetCert(cert)
	}
	return k, nil
}

// nvCert reads a DER certificate from an NV index, or returns nil when the
// index is absent, unreadable or holds no certificate. Some TPMs pad the
// index after the DER, so only the first ASN.1 element is parsed.
func (t *TPM) nvCert(index uint32) *x509.Certificate {
	der, err := tpm2.NVReadEx(t.rw, tpmutil.Handle(index), tpm2.HandleOwner, "", 0)
	if err != nil {
		return nil
	}
	var raw asn1.RawValue
	if _, err := asn1.Unmarshal(der, &raw); err != nil {
		return nil
	}
	cert, err := x509.ParseCertificate(raw.FullBytes)
	if err != nil {
		return nil
	}
	return cert
}

func publicOf(alg Alg, k *client.Key) *PublicKey {
	return &PublicKey{Alg: alg, Key: k.PublicKey(), Cert: k.Cert()}
}

// EK returns the public endorsement key made from the TCG default template
// for alg, with its certificate when the TPM holds one. The EK is the same on
// every call for a given TPM (except the simulator, which is fresh in every
// process). keysvc seals unwrap keys to it with package tpm/importblob.
func (t *TPM) EK(alg Alg) (*PublicKey, error) {
	if err := t.lock(); err != nil {
		return nil, err
	}
	defer t.mu.Unlock()
	k, err := t.loadEK(alg)
	if err != nil {
		return nil, err
	}
	defer k.Close()
	return publicOf(alg, k), nil
}

// AK returns the public attestation key for alg: on a GCE shielded VM the
// GCE AK (made from the template GCE stores in NV, with its certificate in
// Cert), elsewhere the one made from the TCG default AK template in the
// owner hierarchy. It is the key [TPM.Attest] signs with, and is stable for
// a given TPM until its hierarchy is cleared.
// It is trusted only once enrolled (or proven by credential activation
// against the EK); this package does not decide that.
func (t *TPM) AK(alg Alg) (*PublicKey, error) {
	if err := t.lock(); err != nil {
		return nil, err
	}
	defer t.mu.Unlock()
	k, err := t.loadAK(alg)
	if err != nil {
		return nil, err
	}
	defer k.Close()
	return publicOf(alg, k), nil
}
