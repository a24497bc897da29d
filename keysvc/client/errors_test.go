package client

import (
	"errors"
	"net/http"
	"testing"
	"time"

	"github.com/keygate/keygate/keysvc/api"
)

// TestDecode: every answer the service gives decodes into one typed
// result, with the fields a caller branches on.
func TestDecode(t *testing.T) {
	now := time.Now()
	for _, tc := range []struct {
		name       string
		status     int
		retryAfter string
		body       string
		// want: nil for success; otherwise checked by check.
		ok        bool
		refusal   *Refusal
		err       *Error
		temporary bool
	}{
		{name: "200", status: 200, body: `{"state":"active"}`, ok: true},
		{name: "201", status: 201, body: `{"state":"active"}`, ok: true},
		{name: "revoked", status: 403, body: `{"reason":"revoked","hint":"the VM was revoked"}`,
			refusal: &Refusal{Reason: api.ReasonRevoked, Hint: "the VM was revoked"}},
		{name: "policy-denial", status: 403, body: `{"reason":"PCR 7 not allowed","mismatches":[{"pcr":7,"allowed":["00"],"got":"11"}]}`,
			refusal: &Refusal{Reason: api.ReasonPolicy}},
		{name: "403-unparseable", status: 403, body: `<html>`, refusal: &Refusal{Reason: "unknown", Hint: "unparseable 403 body"}},
		{name: "403-error-body", status: 403, body: `{"error":"forbidden by proxy"}`,
			err: &Error{StatusCode: 403, Message: "forbidden by proxy"}},
		{name: "400", status: 400, body: `{"error":"decode request: bad","hint":"see docs/protocol.md"}`,
			err: &Error{StatusCode: 400, Message: "decode request: bad", Hint: "see docs/protocol.md"}},
		{name: "413-no-body", status: 413, body: ``, err: &Error{StatusCode: 413}},
		{name: "429", status: 429, retryAfter: "3", body: `{"error":"slow down"}`,
			err: &Error{StatusCode: 429, Message: "slow down", RetryAfter: 3 * time.Second}, temporary: true},
		{name: "503-retry-after", status: 503, retryAfter: "5", body: `{"error":"database unreachable"}`,
			err: &Error{StatusCode: 503, Message: "database unreachable", RetryAfter: 5 * time.Second}, temporary: true},
		{name: "503-retry-after-date", status: 503, retryAfter: now.Add(90 * time.Second).UTC().Format(http.TimeFormat), body: `{}`,
			err: &Error{StatusCode: 503, RetryAfter: 89 * time.Second}, temporary: true},
		{name: "503-retry-after-huge", status: 503, retryAfter: "86400", body: `{}`,
			err: &Error{StatusCode: 503, RetryAfter: maxRetryAfter}, temporary: true},
		{name: "503-retry-after-garbage", status: 503, retryAfter: "soon", body: `{}`,
			err: &Error{StatusCode: 503}, temporary: true},
		{name: "502-html", status: 502, body: `<html>bad gateway</html>`, err: &Error{StatusCode: 502}, temporary: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := http.Header{}
			if tc.retryAfter != "" {
				h.Set("Retry-After", tc.retryAfter)
			}
			var out api.SessionResponse
			err := Decode("/v1/x", tc.status, "", h, []byte(tc.body), &out)
			if tc.ok {
				if err != nil || out.State != api.StateActive {
					t.Fatalf("Decode = %v, %+v", err, out)
				}
				return
			}
			if tc.refusal != nil {
				var r *Refusal
				if !errors.As(err, &r) || !errors.Is(err, ErrRefused) {
					t.Fatalf("Decode = %v (%T), want *Refusal", err, err)
				}
				if r.Reason != tc.refusal.Reason || (tc.refusal.Hint != "" && r.Hint != tc.refusal.Hint) {
					t.Fatalf("refusal = %+v, want %+v", r, tc.refusal)
				}
				if (r.Reason == api.ReasonPolicy) != (r.Denial != nil) {
					t.Fatalf("policy denial without diagnostics, or diagnostics without one: %+v", r)
				}
				return
			}
			var se *Error
			if !errors.As(err, &se) || errors.Is(err, ErrRefused) {
				t.Fatalf("Decode = %v (%T), want *Error", err, err)
			}
			if se.StatusCode != tc.err.StatusCode || se.Message != tc.err.Message || se.Hint != tc.err.Hint || se.Path != "/v1/x" {
				t.Fatalf("error = %+v, want %+v", se, tc.err)
			}
			// An HTTP date has a one-second resolution.
			if d := se.RetryAfter - tc.err.RetryAfter; d < 0 || d > time.Second {
				t.Fatalf("RetryAfter = %s, want %s", se.RetryAfter, tc.err.RetryAfter)
			}
			if se.Temporary() != tc.temporary {
				t.Fatalf("Temporary = %v", se.Temporary())
			}
			if se.Error() == "" {
				t.Fatal("empty message")
			}
		})
	}
	t.Run("bad-200", func(t *testing.T) {
		var out api.SessionResponse
		if err := Decode("/v1/x", 200, "", http.Header{}, []byte(`not json`), &out); err == nil {
			t.Fatal("accepted a 200 that is not JSON")
		}
	})
	t.Run("raw", func(t *testing.T) {
		var raw []byte
		if err := Decode("/v1/x", 200, "", http.Header{}, []byte(`{"a":1}`), &raw); err != nil || string(raw) != `{"a":1}` {
			t.Fatalf("raw = %q, %v", raw, err)
		}
	})
}

// FuzzDecode: an answer from the network never panics the decoder or the
// message built from it, always yields one of the typed results, and a
// policy denial keeps its mismatches.
func FuzzDecode(f *testing.F) {
	f.Add(403, "", []byte(`{"reason":"revoked","hint":"the VM was revoked"}`))
	f.Add(403, "", []byte(`{"reason":"PCR 7 not allowed","mismatches":[{"pcr":7,"allowed":["00"],"got":"11"}],"rules":[{"rule":"secure_boot","want":"enabled","got":"disabled"}]}`))
	f.Add(403, "", []byte(`{"mismatches":null}`))
	f.Add(503, "5", []byte(`{"error":"database unreachable","hint":"retry"}`))
	f.Add(503, "Wed, 21 Oct 2015 07:28:00 GMT", []byte(`not json`))
	f.Add(200, "", []byte(`{"state":"revoked"}`))
	f.Fuzz(func(t *testing.T, status int, retryAfter string, b []byte) {
		if status < 100 || status > 999 {
			return
		}
		h := http.Header{}
		h.Set("Retry-After", retryAfter)
		var out api.SessionResponse
		err := Decode("/v1/x", status, "", h, b, &out)
		if err == nil {
			if status/100 != 2 {
				t.Fatalf("status %d decoded as success", status)
			}
			return
		}
		_ = err.Error()
		var r *Refusal
		var se *Error
		switch {
		case errors.As(err, &r):
			if status != 403 {
				t.Fatalf("refusal from status %d", status)
			}
			if r.Denial != nil && r.Reason != api.ReasonPolicy {
				t.Fatalf("denial with reason %q", r.Reason)
			}
		case errors.As(err, &se):
			if se.StatusCode != status || se.RetryAfter < 0 || se.RetryAfter > maxRetryAfter {
				t.Fatalf("error %+v from status %d", se, status)
			}
		default:
			if status/100 != 2 {
				t.Fatalf("status %d gave %T", status, err)
			}
		}
	})
}
