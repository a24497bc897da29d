package attest_test

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"

	"github.com/keygate/keygate/attest"
)

var (
	hexA = strings.Repeat("a", 64)
	hexB = strings.Repeat("b", 64)
)

func TestParsePolicy(t *testing.T) {
	tests := []struct {
		name    string
		in      string
		wantErr string // substring; empty means ok
	}{
		{"one PCR", `{"pcrs":{"7":["` + hexA + `"]}}`, ""},
		{"two values for one PCR", `{"pcrs":{"4":["` + hexA + `","` + hexB + `"]}}`, ""},
		{"rules", `{"pcrs":{"0":["` + hexA + `"]},"secure_boot":true,"kernel_cmdline":{"equals":"ro quiet","contains":["ro"]}}`, ""},
		{"uppercase hex", `{"pcrs":{"0":["` + strings.ToUpper(hexA) + `"]}}`, ""},
		{"empty policy", `{"pcrs":{}}`, ""},
		{"PCR 23", `{"pcrs":{"23":["` + hexA + `"]}}`, ""},
		{"PCR 24", `{"pcrs":{"24":["` + hexA + `"]}}`, "out of range"},
		{"negative PCR", `{"pcrs":{"-1":["` + hexA + `"]}}`, "out of range"},
		{"non-canonical index", `{"pcrs":{"07":["` + hexA + `"]}}`, "not a decimal number"},
		{"index not a number", `{"pcrs":{"x":["` + hexA + `"]}}`, "not a decimal number"},
		{"empty set", `{"pcrs":{"7":[]}}`, "no allowed values"},
		{"null set", `{"pcrs":{"7":null}}`, "no allowed values"},
		{"short value", `{"pcrs":{"7":["abcd"]}}`, "want a 32-byte"},
		{"SHA-1 value", `{"pcrs":{"7":["` + strings.Repeat("a", 40) + `"]}}`, "want a 32-byte"},
		{"not hex", `{"pcrs":{"7":["` + strings.Repeat("z", 64) + `"]}}`, "not hex"},
		{"duplicate value", `{"pcrs":{"7":["` + hexA + `","` + hexA + `"]}}`, "twice"},
		{"unknown field", `{"pcrs":{},"secureboot":true}`, "unknown field"},
		{"trailing data", `{"pcrs":{}} {}`, "trailing data"},
		{"empty cmdline rule", `{"pcrs":{},"kernel_cmdline":{}}`, "rule is empty"},
		{"cmdline word with space", `{"pcrs":{},"kernel_cmdline":{"contains":["a b"]}}`, "one non-empty word"},
		{"not JSON", `pcrs`, "parse policy"},
		{"array", `[]`, "parse policy"},
		{"too many values", `{"pcrs":{"7":[` + manyValues(attest.MaxValuesPerPCR+1) + `]}}`, "more than"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			p, err := attest.ParsePolicy([]byte(tc.in))
			if tc.wantErr == "" {
				if err != nil {
					t.Fatalf("ParsePolicy: %v", err)
				}
				// Round trip: marshal, parse again, marshal: same bytes.
				b1, err := json.Marshal(p)
				if err != nil {
					t.Fatal(err)
				}
				q, err := attest.ParsePolicy(b1)
				if err != nil {
					t.Fatalf("reparse %s: %v", b1, err)
				}
				b2, _ := json.Marshal(q)
				if !bytes.Equal(b1, b2) {
					t.Fatalf("round trip differs:\n%s\n%s", b1, b2)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("err = %v, want one containing %q", err, tc.wantErr)
			}
		})
	}
}

func TestPolicyJSONShape(t *testing.T) {
	p := &attest.Policy{
		PCRs:       map[int][][]byte{7: {bytes.Repeat([]byte{0xab}, 32)}, 10: {bytes.Repeat([]byte{1}, 32)}},
		SecureBoot: boolp(true),
	}
	b, err := json.Marshal(p)
	if err != nil {
		t.Fatal(err)
	}
	want := `{"pcrs":{"10":["` + strings.Repeat("01", 32) + `"],"7":["` + strings.Repeat("ab", 32) + `"]},"secure_boot":true}`
	if string(b) != want {
		t.Errorf("json = %s\nwant   %s", b, want)
	}
	var q attest.Policy
	if err := json.Unmarshal(b, &q); err != nil {
		t.Fatalf("json.Unmarshal: %v", err)
	}
	if len(q.PCRs) != 2 || q.SecureBoot == nil || !*q.SecureBoot {
		t.Errorf("unmarshaled %+v", q)
	}
}

func manyValues(n int) string {
	vals := make([]string, n)
	for i := range vals {
		vals[i] = `"` + strings.Repeat("0", 62) + string("0123456789abcdef"[i/16]) + string("0123456789abcdef"[i%16]) + `"`
	}
	return strings.Join(vals, ",")
}
