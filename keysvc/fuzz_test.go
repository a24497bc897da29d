package keysvc

import (
	"encoding/json"
	"testing"
	"time"

	"github.com/keygate/keygate/keysvc/api"
)

// FuzzDecodeRequest feeds outside bytes to the strict decoder of every
// request body, and to the challenge-token peek of /v1/unlock. Nothing may
// panic; whatever decodes must re-encode and decode to the same value.
func FuzzDecodeRequest(f *testing.F) {
	for _, s := range []string{
		`{"vm":"web-1","volume":"data","ek_pub":"-----BEGIN PUBLIC KEY-----\nAA==\n-----END PUBLIC KEY-----\n","ak_pub":""}`,
		`{"challenge":"v1.AAAA.BBBB","attestation":"CgA="}`,
		`{"session":"s1.e30.AA","events":[{"kind":"ptrace","severity":"critical","pid":7,"comm":"gdb"}]}`,
		`{"name":"vm","ek_pub":"x","provisioning_allowed":true}`,
		`{"id":"vol","vm":"vm","key":"WlpaWg=="}`,
		`{"vm":"a"} {"vm":"b"}`,
		`{"vm":"a","unknown":1}`,
		`[]`, `null`, `{"events":[null]}`, "\xff",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		targets := []func() any{
			func() any { return new(api.ChallengeRequest) },
			func() any { return new(api.UnlockRequest) },
			func() any { return new(api.EventsRequest) },
			func() any { return new(api.EnrollRequest) },
			func() any { return new(api.VolumeRequest) },
		}
		for _, mk := range targets {
			v := mk()
			if DecodeJSON(data, v) != nil {
				continue
			}
			b, err := json.Marshal(v)
			if err != nil {
				t.Fatalf("re-encode %T: %v", v, err)
			}
			w := mk()
			if err := DecodeJSON(b, w); err != nil {
				t.Fatalf("decode re-encoded %T %s: %v", v, b, err)
			}
			b2, _ := json.Marshal(w)
			if string(b) != string(b2) {
				t.Fatalf("%T does not round-trip: %s vs %s", v, b, b2)
			}
		}
		peekNames(string(data))
	})
}

func TestPeekNames(t *testing.T) {
	if _, _, ok := peekNames("v1.AAAA.BBBB"); ok {
		t.Fatal("short payload accepted")
	}
}

func TestLimiter(t *testing.T) {
	now := time.Unix(1000, 0)
	l := newLimiter(2, func() time.Time { return now })
	for i := range 4 { // burst is twice the rate
		if !l.allow("a") {
			t.Fatalf("request %d refused within the burst", i)
		}
	}
	if l.allow("a") {
		t.Fatal("request beyond the burst allowed")
	}
	if !l.allow("b") {
		t.Fatal("another key shares the bucket")
	}
	now = now.Add(time.Second)
	// Three requests in a row: two allowed, the third not.
	first, second, third := l.allow("a"), l.allow("a"), l.allow("a")
	if !first || !second || third {
		t.Fatal("refill is not 2 per second")
	}
	if newLimiter(0, time.Now) != nil || !(*limiter)(nil).allow("x") {
		t.Fatal("a zero rate must turn the limit off")
	}
}
