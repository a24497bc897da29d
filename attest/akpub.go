package attest

import (
	"crypto"
	"errors"
	"fmt"

	"github.com/google/go-tpm/legacy/tpm2"
)

// akRequired are the attributes an attestation key must have: a restricted
// signing key that never leaves its TPM. Restricted is what stops the TPM
// from signing outside data that looks like a quote.
const akRequired = tpm2.FlagSign | tpm2.FlagRestricted | tpm2.FlagFixedTPM | tpm2.FlagFixedParent | tpm2.FlagSensitiveDataOrigin

// CheckAKPublic parses an AK public area (a TPMT_PUBLIC, as in
// Attestation.AkPub and `keygate tpm ak`) and checks that it describes an
// attestation key: a restricted signing key, fixed to its TPM, not a
// decryption key, with a SHA-256 or stronger name algorithm. It returns the
// public key. The key service calls it when it enrolls an AK; Verify then
// trusts the enrolled key.
//
// The attributes mean something only for the exact area whose name was
// proven by credential activation, or that came from a trusted source.
func CheckAKPublic(area []byte) (crypto.PublicKey, error) {
	pub, err := tpm2.DecodePublic(area)
	if err != nil {
		return nil, fmt.Errorf("decode AK public area: %v", err)
	}
	if pub.Attributes&akRequired != akRequired {
		return nil, fmt.Errorf("AK attributes %#x lack %#x: not a restricted signing key fixed to its TPM; create the AK as go-tpm-tools client.AttestationKeyECC does",
			uint32(pub.Attributes), uint32(akRequired&^pub.Attributes))
	}
	if pub.Attributes&tpm2.FlagDecrypt != 0 {
		return nil, errors.New("AK is also a decryption key; an attestation key must only sign")
	}
	switch pub.NameAlg {
	case tpm2.AlgSHA256, tpm2.AlgSHA384, tpm2.AlgSHA512:
	default:
		return nil, fmt.Errorf("AK name algorithm %v is weaker than SHA-256", pub.NameAlg)
	}
	key, err := pub.Key()
	if err != nil {
		return nil, fmt.Errorf("AK public key: %v", err)
	}
	return key, nil
}
