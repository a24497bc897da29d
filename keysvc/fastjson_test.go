package keysvc

import (
	"bytes"
	"encoding/json"
	"testing"

	"github.com/keygate/keygate/keysvc/api"
)

// FuzzUnlockFastPath checks decodeUnlockFast against encoding/json: what
// the fast path accepts, the general decoder must accept with the same
// result.
func FuzzUnlockFastPath(f *testing.F) {
	for _, s := range []string{
		`{"challenge":"v1.abc.def","attestation":"AAEC"}`,
		` { "attestation" : "AAECAw==" , "challenge" : "v1.x.y" } `,
		`{"challenge":"","attestation":""}`,
		`{"challenge":"a","attestation":"AAE"}`,
		`{"challenge":"a","attestation":"AA=="}x`,
		`{"challenge":"a","challenge":"b","attestation":"AA=="}`,
		`{"Challenge":"a","attestation":"AA=="}`,
		`{"challenge":"a\u0041","attestation":"AA=="}`,
		"{\"challenge\":\"\xff\",\"attestation\":\"AA==\"}",
		`{"challenge":null,"attestation":"AA=="}`,
		`{"challenge":"a","attestation":"AA==","x":1}`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		var fast api.UnlockRequest
		if !decodeUnlockFast(data, &fast) {
			if fast.Challenge != "" || fast.Attestation != nil {
				t.Fatalf("refused %q but changed the request: %+v", data, fast)
			}
			return
		}
		var slow api.UnlockRequest
		dec := json.NewDecoder(bytes.NewReader(data))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&slow); err != nil {
			t.Fatalf("fast path accepted %q, encoding/json refuses it: %v", data, err)
		}
		if _, err := dec.Token(); err == nil {
			t.Fatalf("fast path accepted %q, which has trailing data", data)
		}
		if fast.Challenge != slow.Challenge || !bytes.Equal(fast.Attestation, slow.Attestation) || (fast.Attestation == nil) != (slow.Attestation == nil) {
			t.Fatalf("%q: fast %+v, encoding/json %+v", data, fast, slow)
		}
	})
}

// TestUnlockFastPathTaken checks that the shape clients send takes the fast
// path, and that the shapes it leaves to encoding/json are still decoded
// (or refused) the general way.
func TestUnlockFastPathTaken(t *testing.T) {
	plain, err := json.Marshal(api.UnlockRequest{Challenge: "v1.a.b", Attestation: []byte{0, 1, 2, 250}})
	if err != nil {
		t.Fatal(err)
	}
	var u api.UnlockRequest
	if !decodeUnlockFast(plain, &u) || u.Challenge != "v1.a.b" || !bytes.Equal(u.Attestation, []byte{0, 1, 2, 250}) {
		t.Fatalf("encoding/json's own output %s did not take the fast path: %+v", plain, u)
	}
	for _, tc := range []struct {
		body string
		ok   bool
	}{
		{`{"challenge":"v1.\u0061.b","attestation":"AA=="}`, true}, // an escape: general path
		{`{"Challenge":"v1.a.b","attestation":"AA=="}`, true},      // encoding/json folds case
		{`{"challenge":"v1.a.b","attestation":"AA=="} {}`, false},
		{`{"challenge":"v1.a.b","attestation":"!!"}`, false},
		{`{"challenge":"v1.a.b","attestation":"AA==","extra":1}`, false},
	} {
		var u api.UnlockRequest
		if err := DecodeJSON([]byte(tc.body), &u); (err == nil) != tc.ok {
			t.Errorf("DecodeJSON(%s): %v, want ok=%v", tc.body, err, tc.ok)
		}
	}
}
