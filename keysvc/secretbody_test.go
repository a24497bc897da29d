package keysvc

import (
	"bytes"
	"io"
	"net/http"
	"net/http/httptest"
	"testing"

	"github.com/keygate/keygate/keysvc/api"
)

// recordingBody is a request body that remembers every buffer the server
// reads it into, so the test can look at them afterwards.
type recordingBody struct {
	r    io.Reader
	bufs [][]byte
}

func (b *recordingBody) Read(p []byte) (int, error) {
	n, err := b.r.Read(p)
	if n > 0 {
		b.bufs = append(b.bufs, p[:n])
	}
	return n, err
}

func (b *recordingBody) Close() error { return nil }

// TestSecretBodyWiped: the body of a volume import (base64 of the key
// file) is wiped once decoded, whether the request is accepted or refused;
// an ordinary body is left alone.
func TestSecretBodyWiped(t *testing.T) {
	const body = `{"id":"v","vm":"m","key":"c2VjcmV0IGtleSBmaWxlIGJ5dGVz"}`
	for _, tc := range []struct {
		name  string
		read  func(http.ResponseWriter, *http.Request, int64, any) *httpError
		body  string
		wiped bool
	}{
		{"secret body", readSecretJSON, body, true},
		{"secret body that fails to decode", readSecretJSON, body[:len(body)-1], true},
		{"ordinary body", readJSON, body, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rb := &recordingBody{r: bytes.NewReader([]byte(tc.body))}
			r := httptest.NewRequest("POST", "/v1/admin/volumes", nil)
			r.Body, r.ContentLength = rb, int64(len(tc.body))
			var req api.VolumeRequest
			tc.read(httptest.NewRecorder(), r, api.MaxAdminBody, &req)
			clear(req.Key)
			seen := 0
			for _, b := range rb.bufs {
				seen += len(b)
				if zero := bytes.Count(b, []byte{0}) == len(b); zero != tc.wiped {
					t.Fatalf("body buffer %q: wiped=%v, want %v", b, zero, tc.wiped)
				}
			}
			if seen != len(tc.body) {
				t.Fatalf("the body was read into %d bytes of buffers, want %d", seen, len(tc.body))
			}
		})
	}
}
