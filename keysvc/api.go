package keysvc

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"

	"github.com/keygate/keygate/keysvc/api"
)

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
	if u, ok := v.(*api.UnlockRequest); ok && decodeUnlockFast(data, u) {
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
	writeJSON(w, e.status, api.ErrorBody{Error: e.msg, Hint: e.hint})
}
