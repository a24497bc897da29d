package attest

import (
	"bytes"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"slices"
	"strconv"
	"strings"
)

// Limits of a policy. They bound the work a parse and an evaluation do.
const (
	// NumPCRs is the number of PCRs a policy may name (0 to NumPCRs-1).
	NumPCRs = 24
	// PCRSize is the size of a SHA-256 PCR value.
	PCRSize = 32
	// MaxValuesPerPCR caps the allowed values listed for one PCR.
	MaxValuesPerPCR = 32
	// MaxPolicySize caps the JSON ParsePolicy reads.
	MaxPolicySize = 1 << 20
	// maxCmdlineRule caps a kernel command-line rule string.
	maxCmdlineRule = 4096
)

// Policy is what a VM's boot must look like for its keys to be released.
// It is data: parse it with ParsePolicy, check it with Validate, and
// evaluate it with Verify.
type Policy struct {
	// PCRs maps a PCR index (SHA-256 bank) to its allowed values. A PCR
	// passes if its quoted value equals any one of them, so an update can be
	// rolled out by allowing the old and the new value for a while.
	PCRs map[int][][]byte
	// SecureBoot, when set, requires the UEFI event log to show Secure Boot
	// in that state.
	SecureBoot *bool
	// KernelCmdline, when set, constrains the kernel command line measured
	// by the boot loader (GRUB's "kernel_cmdline" event in PCR 8).
	KernelCmdline *CmdlineRule
}

// CmdlineRule constrains a kernel command line. Equals, when non-empty,
// must match the whole command line; each Contains entry must appear in it
// as a whole space-separated word (e.g. "lockdown=integrity").
type CmdlineRule struct {
	Equals   string   `json:"equals,omitempty"`
	Contains []string `json:"contains,omitempty"`
}

// policyJSON is the wire form: PCR indexes as decimal strings, values as
// lowercase hex.
type policyJSON struct {
	PCRs          map[string][]string `json:"pcrs"`
	SecureBoot    *bool               `json:"secure_boot,omitempty"`
	KernelCmdline *CmdlineRule        `json:"kernel_cmdline,omitempty"`
}

// ParsePolicy parses and validates a policy from untrusted JSON:
//
//	{"pcrs": {"0": ["<64 hex digits>", ...], "7": [...]},
//	 "secure_boot": true,
//	 "kernel_cmdline": {"equals": "...", "contains": ["..."]}}
//
// Unknown fields, trailing data, non-canonical PCR indexes ("07"), duplicate
// values and anything Validate refuses are errors.
func ParsePolicy(data []byte) (*Policy, error) {
	if len(data) > MaxPolicySize {
		return nil, fmt.Errorf("parse policy: %d bytes, more than the %d allowed", len(data), MaxPolicySize)
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	var w policyJSON
	if err := dec.Decode(&w); err != nil {
		return nil, fmt.Errorf("parse policy: %v", err)
	}
	if _, err := dec.Token(); err != io.EOF {
		return nil, errors.New("parse policy: trailing data after the JSON object")
	}
	p := &Policy{PCRs: make(map[int][][]byte, len(w.PCRs)), SecureBoot: w.SecureBoot, KernelCmdline: w.KernelCmdline}
	for k, vals := range w.PCRs {
		idx, err := strconv.Atoi(k)
		if err != nil || strconv.Itoa(idx) != k {
			return nil, fmt.Errorf("parse policy: PCR index %q is not a decimal number 0-%d", truncate(k, 16), NumPCRs-1)
		}
		set := make([][]byte, 0, len(vals))
		for i, v := range vals {
			b, err := hex.DecodeString(v)
			if err != nil {
				return nil, fmt.Errorf("parse policy: PCR %d value %d: not hex: %v", idx, i, err)
			}
			set = append(set, b)
		}
		p.PCRs[idx] = set
	}
	if err := p.Validate(); err != nil {
		return nil, fmt.Errorf("parse policy: %w", err)
	}
	return p, nil
}

// MarshalJSON encodes p in the form ParsePolicy reads. PCR indexes are
// sorted (encoding/json sorts map keys) and values keep their order.
func (p Policy) MarshalJSON() ([]byte, error) {
	w := policyJSON{PCRs: make(map[string][]string, len(p.PCRs)), SecureBoot: p.SecureBoot, KernelCmdline: p.KernelCmdline}
	for idx, set := range p.PCRs {
		vals := make([]string, len(set))
		for i, v := range set {
			vals[i] = hex.EncodeToString(v)
		}
		w.PCRs[strconv.Itoa(idx)] = vals
	}
	return json.Marshal(w)
}

// UnmarshalJSON is ParsePolicy.
func (p *Policy) UnmarshalJSON(data []byte) error {
	q, err := ParsePolicy(data)
	if err != nil {
		return err
	}
	*p = *q
	return nil
}

// Validate checks that p is well formed: PCR indexes 0-23, each with a
// non-empty set of at most MaxValuesPerPCR distinct 32-byte values, and
// event-log rules that constrain something. An empty policy (no PCRs, no
// rules) is valid data, e.g. before learn mode captured one; Verify denies
// against it.
func (p *Policy) Validate() error {
	if p == nil {
		return errors.New("policy is nil")
	}
	for _, idx := range sortedPCRs(p.PCRs) {
		set := p.PCRs[idx]
		if idx < 0 || idx >= NumPCRs {
			return fmt.Errorf("PCR index %d is out of range 0-%d", idx, NumPCRs-1)
		}
		if len(set) == 0 {
			return fmt.Errorf("PCR %d has no allowed values; list at least one or drop the PCR", idx)
		}
		if len(set) > MaxValuesPerPCR {
			return fmt.Errorf("PCR %d lists %d values, more than %d; drop values no VM boots with any more", idx, len(set), MaxValuesPerPCR)
		}
		for i, v := range set {
			if len(v) != PCRSize {
				return fmt.Errorf("PCR %d value %d is %d bytes; want a %d-byte SHA-256 PCR value (%d hex digits)", idx, i, len(v), PCRSize, 2*PCRSize)
			}
			for _, u := range set[:i] {
				if bytes.Equal(u, v) {
					return fmt.Errorf("PCR %d lists value %x twice", idx, v)
				}
			}
		}
	}
	if r := p.KernelCmdline; r != nil {
		if r.Equals == "" && len(r.Contains) == 0 {
			return errors.New(`kernel_cmdline rule is empty; set "equals" or "contains", or drop the rule`)
		}
		if len(r.Equals) > maxCmdlineRule {
			return fmt.Errorf("kernel_cmdline equals is %d bytes, more than %d", len(r.Equals), maxCmdlineRule)
		}
		if len(r.Contains) > MaxValuesPerPCR {
			return fmt.Errorf("kernel_cmdline contains lists %d words, more than %d", len(r.Contains), MaxValuesPerPCR)
		}
		for i, w := range r.Contains {
			if w == "" || len(w) > maxCmdlineRule || strings.ContainsAny(w, " \t\n") {
				return fmt.Errorf("kernel_cmdline contains entry %d must be one non-empty word without spaces", i)
			}
		}
	}
	return nil
}

// Empty reports whether p constrains nothing.
func (p *Policy) Empty() bool {
	return p == nil || (len(p.PCRs) == 0 && p.SecureBoot == nil && p.KernelCmdline == nil)
}

func sortedPCRs[V any](m map[int]V) []int {
	idx := make([]int, 0, len(m))
	for i := range m {
		idx = append(idx, i)
	}
	slices.Sort(idx)
	return idx
}
