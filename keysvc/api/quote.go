package api

import "crypto/sha256"

// QuoteData is what a VM's TPM quote qualifies (TPMS_ATTEST.extraData) for a
// challenge's nonce: SHA-256 of "keygate quote v2", a zero byte, the SHA-256
// of the service CA certificate (DER) the VM trusts, and the nonce. Both
// ends compute it: the VM with the CA it pinned, the service with its own.
//
// The CA is in it because a VM may take its pin from the volume's keygate
// token, which sits in the unauthenticated LUKS2 header: whoever can write
// the disk could pin a CA of their own and relay the VM's requests to the
// real service, then answer later heartbeats "active" after a revoke. A
// quote made through such a relay names the relay's CA, so it does not
// verify at the real service and nothing is released.
func QuoteData(nonce []byte, caSHA256 [32]byte) []byte {
	h := sha256.New()
	h.Write([]byte("keygate quote v2\x00"))
	h.Write(caSHA256[:])
	h.Write(nonce)
	return h.Sum(nil)
}
