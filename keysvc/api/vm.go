// Package api holds the key service's wire types: the JSON bodies of the VM
// API (/v1/challenge, /v1/unlock, /v1/session, /v1/events, /v1/provision,
// /v1/activate) and of the admin API (/v1/admin/…), their size limits, and
// the stable refusal reasons. docs/protocol.md is their specification.
//
// It owns the shapes only: keysvc serves them, keysvc/client sends them,
// and neither end's code lives here, so that a VM-side program (boot)
// imports the wire without the server, its store and its metrics.
package api

// Request body limits. A body over its limit is refused with 413 before it
// is parsed.
const (
	// MaxChallengeBody bounds POST /v1/challenge (names and two PEM keys).
	MaxChallengeBody = 16 << 10
	// MaxUnlockBody bounds POST /v1/unlock (a token and a base64
	// attestation, which carries a UEFI event log on real machines).
	MaxUnlockBody = 1 << 20
	// MaxEventsBody bounds POST /v1/events (MaxEvents events with their
	// strings at their limits).
	MaxEventsBody = 256 << 10
	// MaxEvents bounds the events of one POST /v1/events.
	MaxEvents = 64
	// MaxAdminBody bounds admin requests (a policy is at most 1 MiB).
	MaxAdminBody = 1<<20 + 4<<10
)

// ChallengeRequest is the body of POST /v1/challenge.
type ChallengeRequest struct {
	VM     string `json:"vm"`
	Volume string `json:"volume"`
	EKPub  string `json:"ek_pub"` // PEM
	AKPub  string `json:"ak_pub"` // PEM
}

// ChallengeResponse is the answer to POST /v1/challenge.
type ChallengeResponse struct {
	Nonce     []byte `json:"nonce"`     // base64; the quote's qualifying data
	Challenge string `json:"challenge"` // opaque token, sent back with the attestation
}

// UnlockRequest is the body of POST /v1/unlock.
type UnlockRequest struct {
	Challenge   string `json:"challenge"`
	Attestation []byte `json:"attestation"` // base64 of a go-tpm-tools attest.Attestation proto
}

// UnlockResponse is the 200 answer to POST /v1/unlock.
type UnlockResponse struct {
	ImportBlob []byte `json:"import_blob"` // base64 of a go-tpm-tools tpm.ImportBlob proto
	Session    string `json:"session"`
	// PCRs lists the PCRs (SHA-256 bank) the blob is bound to.
	PCRs []int `json:"pcrs"`
	// NextImportBlob, while the volume's UK is being rotated, is the
	// pending UK sealed the same way (docs/protocol.md, "Rotation"). A VM
	// that ignores it keeps working with ImportBlob.
	NextImportBlob []byte `json:"next_import_blob,omitempty"`
	// RotationCancelling, with NextImportBlob, says an operator cancelled
	// the rotation after the pending UK was released: the VM keeps the
	// current UK if its image still opens with it (and drops any keyslot
	// of the pending one), else completes the rotation, and confirms with
	// the key it kept (docs/protocol.md, "Cancelling a rotation").
	RotationCancelling bool `json:"rotation_cancelling,omitempty"`
}

// SessionResponse is the answer to GET /v1/session.
type SessionResponse struct {
	State string `json:"state"` // "active" or "revoked"
}

// Session states.
const (
	StateActive  = "active"
	StateRevoked = "revoked"
)

// EventsRequest is the body of POST /v1/events.
type EventsRequest struct {
	Session string  `json:"session"`
	Events  []Event `json:"events"`
}

// EventsResponse is the answer to POST /v1/events.
type EventsResponse struct {
	Accepted int    `json:"accepted"`
	State    string `json:"state"` // the session's state, so a heartbeat learns of a revoke
}

// Refusal is the 403 body for a refusal that is not a policy denial
// (revoked, erased, unknown EK, …). Policy denials use attest.Denial's JSON,
// which has the same "reason" field plus "mismatches".
type Refusal struct {
	Reason string `json:"reason"`
	Hint   string `json:"hint,omitempty"`
}

// Refusal reasons, stable strings that scripts and metrics can rely on.
const (
	ReasonPolicy        = "policy"          // PCRs or event-log rules not allowed (body is attest.Denial)
	ReasonRevoked       = "revoked"         // the VM was revoked
	ReasonErased        = "erased"          // the volume's key was destroyed
	ReasonUnknownVM     = "unknown-vm"      // no VM of that name is enrolled
	ReasonUnknownVolume = "unknown-volume"  // no such volume for this VM
	ReasonUnknownEK     = "unknown-ek"      // the EK is not the one enrolled for the VM
	ReasonUnknownAK     = "unknown-ak"      // the AK is not the one enrolled for the VM
	ReasonNoAK          = "ak-not-enrolled" // the VM has no trusted AK yet
	ReasonChallenge     = "challenge"       // token malformed, forged, expired, replayed or bound elsewhere
	ReasonEvidence      = "evidence"        // quote signature, nonce or structure invalid
	// ReasonNoProvisioning: POST /v1/provision by a VM not allowed to.
	ReasonNoProvisioning = "provisioning-refused"
	// ReasonVolumeExists: POST /v1/provision of a volume that exists.
	ReasonVolumeExists = "volume-exists"
	// ReasonIntegrity: the service's stored records for this VM or volume
	// fail their integrity check (changed outside the service); nothing is
	// released until an operator restores them.
	ReasonIntegrity = "store-integrity"
)

// ErrorBody is the JSON body of every 4xx/5xx answer other than a 403
// refusal: what went wrong, and what to do about it.
type ErrorBody struct {
	Error string `json:"error"`
	Hint  string `json:"hint,omitempty"`
}

// ActivateRequest is the body of POST /v1/activate.
type ActivateRequest struct {
	VM    string `json:"vm"`
	EKPub string `json:"ek_pub"` // PEM
	// AKPublic is the AK's TPMT_PUBLIC area (go-tpm tpm2.Public.Encode,
	// Attestation.AkPub).
	AKPublic []byte `json:"ak_public"`
}

// ActivateResponse is the answer to POST /v1/activate: the arguments of
// TPM2_ActivateCredential (TPM2B_ID_OBJECT and TPM2B_ENCRYPTED_SECRET, with
// their size prefixes) and the token for the second step.
type ActivateResponse struct {
	CredentialBlob  []byte `json:"credential_blob"`
	EncryptedSecret []byte `json:"encrypted_secret"`
	Activation      string `json:"activation"`
}

// ActivateFinishRequest is the body of POST /v1/activate/finish.
type ActivateFinishRequest struct {
	Activation string `json:"activation"`
	Secret     []byte `json:"secret"`
}

// ActivateFinishResponse is the answer to POST /v1/activate/finish.
type ActivateFinishResponse struct {
	AKFingerprint string `json:"ak_fingerprint"`
}

// ReasonAKEnrolled: POST /v1/activate for a VM that has an AK already.
const ReasonAKEnrolled = "ak-enrolled"

// UKSize is the size of a volume's unwrap key made by volume create.
const UKSize = 32
