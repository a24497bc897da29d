package client

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/keygate/keygate/attest"
	"github.com/keygate/keygate/keysvc/api"
)

// ErrRefused matches (errors.Is) every *Refusal: the key service answered,
// and said no. Retrying does not help, nor does asking another replica;
// the operator must act.
var ErrRefused = errors.New("key service refused")

// ErrTLS matches a TLS failure that no retry can mend: the service's
// certificate is not signed by the pinned CA (a wrong CA file, or a machine
// in the middle).
var ErrTLS = errors.New("key service certificate not trusted")

// Refusal is a 403 answer of the key service. Denial is set for a policy
// denial and carries the per-PCR diagnostics the service sent.
type Refusal struct {
	Reason string // api.Reason*
	Hint   string
	Denial *attest.Denial
}

func (r *Refusal) Error() string {
	if r.Denial != nil {
		var b strings.Builder
		fmt.Fprintf(&b, "key service refused (%s): %s", r.Reason, r.Denial.Reason)
		for _, m := range r.Denial.Mismatches {
			if m.Missing {
				fmt.Fprintf(&b, "\n  PCR %d: not in the quote", m.PCR)
				continue
			}
			fmt.Fprintf(&b, "\n  PCR %d: got %s, allowed %s", m.PCR, m.Got, strings.Join(m.Allowed, " or "))
		}
		for _, rf := range r.Denial.Rules {
			fmt.Fprintf(&b, "\n  rule %s: want %s, got %s", rf.Rule, rf.Want, rf.Got)
		}
		return b.String()
	}
	if r.Hint != "" {
		return fmt.Sprintf("key service refused (%s): %s", r.Reason, r.Hint)
	}
	return fmt.Sprintf("key service refused (%s)", r.Reason)
}

// Is makes errors.Is(r, ErrRefused) true.
func (r *Refusal) Is(target error) bool { return target == ErrRefused }

// Error is an answer other than 2xx and 403: the status, the service's
// api.ErrorBody (message and hint), and Retry-After when it sent one.
type Error struct {
	Path       string // the request's path, /v1/…
	StatusCode int    // 400, 404, 413, 429, 500, 503, …
	Status     string // the status line's text, "503 Service Unavailable"
	Message    string // ErrorBody.Error; empty when the body was not an ErrorBody
	Hint       string // ErrorBody.Hint
	// RetryAfter is the Retry-After header (seconds or an HTTP date), 0
	// when absent.
	RetryAfter time.Duration
}

func (e *Error) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s: key service answered %s", e.Path, e.Status)
	if e.Message != "" {
		b.WriteString(": " + e.Message)
		if e.Hint != "" {
			b.WriteString(" (" + e.Hint + ")")
		}
	}
	if e.RetryAfter > 0 {
		fmt.Fprintf(&b, "; retry after %s", e.RetryAfter)
	}
	return b.String()
}

// Temporary reports whether the answer says "not now" rather than "no": a
// 5xx (the replica or its database is unwell) or 429 (slow down).
func (e *Error) Temporary() bool {
	return e.StatusCode >= 500 || e.StatusCode == http.StatusTooManyRequests
}

// failover reports whether another replica should be asked: a replica that
// answers 5xx is unwell, and its peers may not be. A 429 is not: each
// replica keeps its own rate limits, and shopping a throttled request
// around would multiply them.
func (e *Error) failover() bool { return e.StatusCode >= 500 }

// UnreachableError is a failure to get an answer worth keeping from any
// replica: no connection, a connection that broke, or a temporary answer
// (5xx, 429). It is the one kind of failure worth retrying later.
type UnreachableError struct{ Err error }

func (e *UnreachableError) Error() string { return "key service unreachable: " + e.Err.Error() }
func (e *UnreachableError) Unwrap() error { return e.Err }

// RetryAfter is the longest Retry-After among the answers behind e (0 when
// none sent one): how long the service asked to be left alone.
func (e *UnreachableError) RetryAfter() time.Duration {
	var d time.Duration
	walk(e.Err, func(err error) {
		if se, ok := err.(*Error); ok {
			d = max(d, se.RetryAfter)
		}
	})
	return d
}

// walk calls f on err and every error it wraps, through errors.Join too.
func walk(err error, f func(error)) {
	if err == nil {
		return
	}
	f(err)
	switch u := err.(type) {
	case interface{ Unwrap() []error }:
		for _, e := range u.Unwrap() {
			walk(e, f)
		}
	case interface{ Unwrap() error }:
		walk(u.Unwrap(), f)
	}
}

// Decode turns an answer into the error it stands for: nil for 2xx (body
// decoded into out, which may be nil or a *[]byte for the raw body), a *Refusal for 403, an *Error for
// anything else. It is the one place the service's error bodies are read.
func Decode(path string, status int, statusText string, header http.Header, body []byte, out any) error {
	switch {
	case status/100 == 2:
		if out == nil {
			return nil
		}
		if raw, ok := out.(*[]byte); ok {
			*raw = body
			return nil
		}
		if err := json.Unmarshal(body, out); err != nil {
			return fmt.Errorf("%s: bad answer from the key service: %v", path, err)
		}
		return nil
	case status == http.StatusForbidden && !isErrorBody(body):
		return parseRefusal(body)
	}
	if statusText == "" {
		statusText = fmt.Sprintf("%d %s", status, http.StatusText(status))
	}
	e := &Error{Path: path, StatusCode: status, Status: statusText, RetryAfter: parseRetryAfter(header.Get("Retry-After"), time.Now())}
	var eb api.ErrorBody
	if json.Unmarshal(body, &eb) == nil {
		e.Message, e.Hint = eb.Error, eb.Hint
	}
	return e
}

// maxRetryAfter caps what a Retry-After may ask for, so that a confused
// or hostile answer cannot park a VM for a day.
const maxRetryAfter = 5 * time.Minute

// parseRetryAfter reads Retry-After: delay-seconds or an HTTP date.
func parseRetryAfter(v string, now time.Time) time.Duration {
	if v == "" {
		return 0
	}
	var d time.Duration
	if n, err := strconv.ParseUint(strings.TrimSpace(v), 10, 32); err == nil {
		d = time.Duration(n) * time.Second
	} else if t, err := http.ParseTime(v); err == nil {
		d = t.Sub(now)
	}
	return min(max(d, 0), maxRetryAfter)
}

// isErrorBody reports whether a 403 body is an api.ErrorBody (a proxy's
// or a future endpoint's "forbidden") rather than a refusal.
func isErrorBody(b []byte) bool {
	var v struct {
		Error  string `json:"error"`
		Reason string `json:"reason"`
	}
	return json.Unmarshal(b, &v) == nil && v.Error != "" && v.Reason == ""
}

// parseRefusal reads a 403 body: an api.Refusal, or a policy denial
// (attest.Denial's JSON, which adds "mismatches").
func parseRefusal(b []byte) error {
	var raw struct {
		api.Refusal
		Mismatches json.RawMessage `json:"mismatches"`
	}
	if err := json.Unmarshal(b, &raw); err != nil {
		return &Refusal{Reason: "unknown", Hint: "unparseable 403 body"}
	}
	r := &Refusal{Reason: raw.Reason, Hint: raw.Hint}
	if raw.Mismatches != nil {
		d := &attest.Denial{}
		if err := json.Unmarshal(b, d); err == nil {
			r.Reason, r.Denial = api.ReasonPolicy, d
		}
	}
	return r
}
