package keysvc

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
)

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

// httpError is an error with the status and hint it is answered with.
type httpError struct {
	status int
	msg    string
	hint   string
}

func (e *httpError) Error() string { return e.msg }

func errorf(status int, hint, format string, args ...any) *httpError {
	return &httpError{status: status, msg: fmt.Sprintf(format, args...), hint: hint}
}

// DecodeJSON decodes exactly one JSON value from data into v, refusing
// unknown fields and trailing data. It is what every handler uses on request
// bodies (after the size limit), exported for the fuzz target and for
// clients that want the same strictness.
func DecodeJSON(data []byte, v any) error {
	if u, ok := v.(*UnlockRequest); ok && decodeUnlockFast(data, u) {
		return nil
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return fmt.Errorf("decode request: %v", err)
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return errors.New("decode request: trailing data after the JSON object")
	}
	return nil
}

// readJSON reads a body of at most limit bytes and decodes it strictly.
func readJSON(w http.ResponseWriter, r *http.Request, limit int64, v any) *httpError {
	return readJSONBody(w, r, limit, v, false)
}

// readSecretJSON is readJSON for a body that carries a key (volume import):
// the raw body, base64 of the key, is wiped once decoded. The decoded key is
// the handler's to wipe.
func readSecretJSON(w http.ResponseWriter, r *http.Request, limit int64, v any) *httpError {
	return readJSONBody(w, r, limit, v, true)
}

func readJSONBody(w http.ResponseWriter, r *http.Request, limit int64, v any, wipe bool) *httpError {
	if ct := r.Header.Get("Content-Type"); ct != "" && !isJSONType(ct) {
		return errorf(http.StatusUnsupportedMediaType, "send Content-Type: application/json", "unsupported content type %q", ct)
	}
	body, err := readBody(http.MaxBytesReader(w, r.Body, limit), r.ContentLength, limit)
	if wipe {
		defer clear(body)
	}
	if err != nil {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			return errorf(http.StatusRequestEntityTooLarge, "", "request body is larger than %d bytes", limit)
		}
		return errorf(http.StatusBadRequest, "", "read request body: %v", err)
	}
	if err := DecodeJSON(body, v); err != nil {
		return errorf(http.StatusBadRequest, "see docs/protocol.md for the request's fields", "%v", err)
	}
	return nil
}

// readBody reads rd to its end into a buffer sized from the declared
// length (capped at limit; rd enforces the limit itself), which spares
// io.ReadAll's repeated growing on the attestation-sized bodies of unlock.
func readBody(rd io.Reader, declared, limit int64) ([]byte, error) {
	if declared <= 0 || declared > limit {
		return io.ReadAll(rd)
	}
	buf := make([]byte, 0, declared+1) // +1: room for the read that sees EOF
	for {
		n, err := rd.Read(buf[len(buf):cap(buf)])
		buf = buf[:len(buf)+n]
		switch {
		case err == io.EOF:
			return buf, nil
		case err != nil:
			return buf, err
		case len(buf) == cap(buf): // longer than declared
			rest, err := io.ReadAll(rd)
			return append(buf, rest...), err
		}
	}
}

func isJSONType(ct string) bool {
	return ct == "application/json" || bytes.HasPrefix([]byte(ct), []byte("application/json;"))
}

// writeJSON answers with status and v as JSON.
func writeJSON(w http.ResponseWriter, status int, v any) {
	b, err := json.Marshal(v)
	if err != nil {
		status, b = http.StatusInternalServerError, []byte(`{"error":"encode response"}`)
	}
	h := w.Header()
	h.Set("Content-Type", "application/json")
	h.Set("Cache-Control", "no-store")
	h.Set("X-Content-Type-Options", "nosniff")
	w.WriteHeader(status)
	w.Write(append(b, '\n'))
}

// writeError answers with an ErrorBody.
func writeError(w http.ResponseWriter, e *httpError) {
	writeJSON(w, e.status, ErrorBody{Error: e.msg, Hint: e.hint})
}
