package api

import (
	"crypto/sha256"

	"github.com/keygate/keygate/attest"
)

// Wire types and constants of unwrap-key rotation and continuous
// attestation (issue 15; docs/protocol.md, "Rotation" and
// "Re-attestation").

// ReasonRotateProof: POST /v1/rotate with a proof that is not under the
// volume's pending unwrap key and the session.
const ReasonRotateProof = "rotate-proof"

// RotationPending is VolumeInfo.Rotation while a volume has a second,
// pending unwrap key.
const RotationPending = "pending"

// RotateConfirmRequest is the body of POST /v1/rotate (Authorization:
// Bearer SESSION): the VM's proof that it holds the pending UK, sent once
// its image opens with that UK alone.
type RotateConfirmRequest struct {
	Proof []byte `json:"proof"` // base64 of RotateProof(pending UK, session)
}

// RotateConfirmResponse is the 200 answer to POST /v1/rotate.
type RotateConfirmResponse struct {
	// Rotation is RotationDone: the old UK is destroyed and the proven one
	// is the volume's UK (also the answer to a confirmation repeated after
	// the rotation completed, when the proof is under the volume's UK).
	Rotation string `json:"rotation"`
}

// RotationDone is RotateConfirmResponse.Rotation once the rotation is
// complete.
const RotationDone = "done"

// RotationCancelled is the answer to a cancel (POST
// /v1/admin/volumes/{id}/rotate/cancel) that destroyed the pending UK at
// once (it was never released), and RotateConfirmResponse.Rotation when a
// VM's proof under the current UK ends a cancel that waited for it.
const RotationCancelled = "cancelled"

// RotationCancelling is VolumeInfo.Rotation after a cancel of a rotation
// whose pending UK was released already: the VM's image may hold that key
// alone, so the service keeps both until the VM's next boot says which one
// it holds (docs/protocol.md, "Cancelling a rotation").
const RotationCancelling = "cancelling"

// rotateProofLabel is the domain of the rotation proof's HMAC.
const rotateProofLabel = "keygate rotate confirm v1\x00"

// RotateProof is the proof that a VM holds the unwrap key uk:
// HMAC-SHA256(uk, "keygate rotate confirm v1\x00" || session), with session
// the session token the unlock returned. Bound to the session, it cannot be
// replayed for another unlock; under the key, it cannot be made without it.
//
// It is HMAC spelled out rather than crypto/hmac, whose state keeps the
// key's padded copies on the Go heap until the collector reuses them: here
// the pads are wiped and both hash states reset before it returns.
func RotateProof(uk []byte, session string) []byte {
	var pad [sha256.BlockSize]byte
	var short [sha256.Size]byte
	defer clear(pad[:])
	defer clear(short[:])
	key := uk
	if len(key) > sha256.BlockSize {
		short = sha256.Sum256(key)
		key = short[:]
	}
	pads := func(b byte) []byte {
		for i := range pad {
			pad[i] = b
		}
		for i, k := range key {
			pad[i] ^= k
		}
		return pad[:]
	}
	inner, outer := sha256.New(), sha256.New()
	defer inner.Reset()
	defer outer.Reset()
	inner.Write(pads(0x36))
	inner.Write([]byte(rotateProofLabel))
	inner.Write([]byte(session))
	sum := inner.Sum(nil)
	outer.Write(pads(0x5c))
	outer.Write(sum)
	return outer.Sum(nil)
}

// ReattestChallengeResponse is the answer to POST /v1/reattest/challenge
// (Authorization: Bearer SESSION, no body): a nonce for the quote and a
// challenge token bound to the session.
type ReattestChallengeResponse struct {
	Nonce     []byte `json:"nonce"`
	Challenge string `json:"challenge"`
}

// ReattestRequest is the body of POST /v1/reattest (Authorization: Bearer
// SESSION).
type ReattestRequest struct {
	Challenge   string `json:"challenge"`
	Attestation []byte `json:"attestation"` // base64 of a go-tpm-tools attest.Attestation proto
	// IntervalSeconds is how often the VM re-attests: the service flags
	// the session stale when no re-attestation arrives for twice that
	// (plus a grace of StaleGrace).
	IntervalSeconds int64 `json:"interval_seconds"`
}

// ReattestResponse is the 200 answer to POST /v1/reattest.
type ReattestResponse struct {
	// State is StateActive (keep serving), StateLock (the quote does not
	// match the policy: wipe the keys and stop serving) or StateRevoked.
	State string `json:"state"`
	// Denial, with StateLock, says which PCRs or rules failed.
	Denial *attest.Denial `json:"denial,omitempty"`
	Reason string         `json:"reason,omitempty"`
}

// StateLock is the answer to a re-attestation that fails the policy: the VM
// must wipe its keys and stop serving, as for a revoke.
const StateLock = "lock"

// UnlockDoneEvent is what a VM extends into WindowPCR right after it imports
// its key for volume (tpm.Extend hashes it first). The key service derives
// the value the window PCR (15) must hold while the VM serves from it.
func UnlockDoneEvent(volume string) []byte {
	return []byte("keygate: unlock done: " + volume)
}
