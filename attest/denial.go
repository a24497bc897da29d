package attest

import (
	"encoding/json"
	"errors"
	"fmt"
	"strings"
)

// ErrPolicyDenied matches (errors.Is) every *Denial: the evidence was
// genuine and fresh, but the boot it describes is not one the policy allows.
var ErrPolicyDenied = errors.New("attestation denied by policy")

// Denial says why a genuine attestation was refused. Verify returns it only
// after the quote itself verified, so every value in it is one the TPM
// signed. It marshals to the body of the key service's 403 answer:
//
//	{"reason": "...", "mismatches": [{"pcr": 7, "allowed": ["..."], "got": "..."}],
//	 "rules": [{"rule": "secure_boot", "want": "enabled", "got": "disabled"}]}
type Denial struct {
	Reason     string        `json:"reason"`
	Mismatches []PCRMismatch `json:"mismatches"`
	Rules      []RuleFailure `json:"rules,omitempty"`
}

// PCRMismatch names one policy PCR whose quoted value is not allowed.
type PCRMismatch struct {
	PCR int `json:"pcr"`
	// Allowed are the policy's values, lowercase hex.
	Allowed []string `json:"allowed"`
	// Got is the quoted value, lowercase hex; empty when Missing.
	Got string `json:"got"`
	// Missing is true when the quote did not cover this PCR at all.
	Missing bool `json:"missing,omitempty"`
}

// RuleFailure names one event-log rule that failed.
type RuleFailure struct {
	Rule string `json:"rule"`
	Want string `json:"want"`
	Got  string `json:"got"`
}

// Error lists every mismatch and failed rule on one line.
func (d *Denial) Error() string {
	var b strings.Builder
	b.WriteString(ErrPolicyDenied.Error())
	b.WriteString(": ")
	b.WriteString(d.Reason)
	for _, m := range d.Mismatches {
		if m.Missing {
			fmt.Fprintf(&b, "; PCR %d not in the quote", m.PCR)
			continue
		}
		fmt.Fprintf(&b, "; PCR %d is %s, allowed %s", m.PCR, m.Got, strings.Join(m.Allowed, " or "))
	}
	for _, r := range d.Rules {
		fmt.Fprintf(&b, "; rule %s wants %s, got %s", r.Rule, r.Want, r.Got)
	}
	return b.String()
}

// Is makes errors.Is(d, ErrPolicyDenied) true.
func (d *Denial) Is(target error) bool { return target == ErrPolicyDenied }

// MarshalJSON always writes "mismatches" as an array, never null.
func (d *Denial) MarshalJSON() ([]byte, error) {
	type plain Denial
	c := *d
	if c.Mismatches == nil {
		c.Mismatches = []PCRMismatch{}
	}
	return json.Marshal((*plain)(&c))
}

// newDenial fills in Reason from the mismatches and failed rules.
func newDenial(mm []PCRMismatch, rules []RuleFailure) *Denial {
	var parts []string
	if len(mm) > 0 {
		names := make([]string, len(mm))
		for i, m := range mm {
			names[i] = fmt.Sprintf("PCR %d", m.PCR)
		}
		parts = append(parts, fmt.Sprintf("%s not allowed by the policy", strings.Join(names, ", ")))
	}
	if len(rules) > 0 {
		names := make([]string, len(rules))
		for i, r := range rules {
			names[i] = r.Rule
		}
		parts = append(parts, fmt.Sprintf("event-log rule %s failed", strings.Join(names, ", ")))
	}
	reason := strings.Join(parts, "; ")
	if len(mm) > 0 {
		reason += " (if this boot is a planned update, add its values to the policy, or re-learn it with `keysvc policy learn`)"
	}
	return &Denial{Reason: reason, Mismatches: mm, Rules: rules}
}
