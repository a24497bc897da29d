package testvm

import (
	"crypto"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"sort"
	"strconv"
	"strings"
	"unicode"
	"unicode/utf16"

	"github.com/google/go-eventlog/register"
	"github.com/google/go-eventlog/tcg"
)

// PCRs are SHA-256 PCR values by index.
type PCRs map[int][]byte

// ParsePCRsJSON parses the output of `keygate tpm pcrs --json`.
func ParsePCRsJSON(s string) (PCRs, error) {
	var v struct {
		Bank string            `json:"bank"`
		PCRs map[string]string `json:"pcrs"`
	}
	if err := json.Unmarshal([]byte(s), &v); err != nil {
		return nil, fmt.Errorf("parse keygate tpm pcrs --json output: %v", err)
	}
	if v.Bank != "sha256" {
		return nil, fmt.Errorf("parse keygate tpm pcrs --json output: bank %q, want sha256", v.Bank)
	}
	p := PCRs{}
	for k, h := range v.PCRs {
		i, err := strconv.Atoi(k)
		if err != nil || i < 0 || i > 23 {
			return nil, fmt.Errorf("parse keygate tpm pcrs --json output: PCR index %q", k)
		}
		b, err := hex.DecodeString(h)
		if err != nil || len(b) != crypto.SHA256.Size() {
			return nil, fmt.Errorf("parse keygate tpm pcrs --json output: PCR %d value %q is not a SHA-256 digest", i, h)
		}
		p[i] = b
	}
	if len(p) == 0 {
		return nil, fmt.Errorf("parse keygate tpm pcrs --json output: no PCRs")
	}
	return p, nil
}

// Diff returns the indexes whose values differ between p and q (or that
// only one of them has), in order.
func (p PCRs) Diff(q PCRs) []int {
	seen := map[int]bool{}
	var d []int
	for _, m := range []PCRs{p, q} {
		for i := range m {
			if seen[i] {
				continue
			}
			seen[i] = true
			if hex.EncodeToString(p[i]) != hex.EncodeToString(q[i]) {
				d = append(d, i)
			}
		}
	}
	sort.Ints(d)
	return d
}

// Measurement is one event of the firmware's TCG event log.
type Measurement struct {
	PCR    int
	Type   string
	Digest []byte
	// Data is a printable rendering of the event data (ASCII or UTF-16
	// strings in it), for reading, not for policy.
	Data string
}

// ReplayEventLog parses a crypto-agile TCG event log (the guest's
// binary_bios_measurements) and replays its SHA-256 digests against pcrs.
// It returns the events only if every PCR in pcrs that the log extends
// replays to its value.
func ReplayEventLog(raw []byte, pcrs PCRs) ([]Measurement, error) {
	var mrs []register.MR
	for i, d := range pcrs {
		mrs = append(mrs, register.PCR{Index: i, Digest: d, DigestAlg: crypto.SHA256})
	}
	events, err := tcg.ParseAndReplay(raw, mrs, tcg.ParseOpts{})
	if err != nil {
		return nil, err
	}
	if len(events) == 0 {
		return nil, fmt.Errorf("event log has no events for the given PCRs")
	}
	out := make([]Measurement, 0, len(events))
	for _, e := range events {
		out = append(out, Measurement{PCR: e.Index, Type: e.Type.String(), Digest: e.Digest, Data: printable(e.Data)})
	}
	sort.SliceStable(out, func(i, j int) bool { return out[i].PCR < out[j].PCR })
	return out, nil
}

// MeasuredPCRs returns the PCR indexes that events extend, in order.
func MeasuredPCRs(ms []Measurement) []int {
	seen := map[int]bool{}
	var p []int
	for _, m := range ms {
		if !seen[m.PCR] {
			seen[m.PCR] = true
			p = append(p, m.PCR)
		}
	}
	sort.Ints(p)
	return p
}

// printable extracts the readable strings (ASCII, or UTF-16LE as UEFI
// writes device paths and variable names) from event data.
func printable(b []byte) string {
	ascii := runs(func(yield func(rune)) {
		for _, c := range b {
			yield(rune(c))
		}
	})
	u := make([]uint16, len(b)/2)
	for i := range u {
		u[i] = uint16(b[2*i]) | uint16(b[2*i+1])<<8
	}
	wide := runs(func(yield func(rune)) {
		for _, r := range utf16.Decode(u) {
			yield(r)
		}
	})
	s := ascii
	if len(wide) > len(ascii) {
		s = wide
	}
	if len(s) > 120 {
		s = s[:120] + "…"
	}
	return s
}

// runs joins the runs of at least 4 printable characters with spaces.
func runs(seq func(func(rune))) string {
	var all []string
	var cur []rune
	flush := func() {
		if len(cur) >= 4 {
			all = append(all, string(cur))
		}
		cur = cur[:0]
	}
	seq(func(r rune) {
		if r < 0x80 && unicode.IsPrint(r) {
			cur = append(cur, r)
		} else {
			flush()
		}
	})
	flush()
	return strings.Join(all, " ")
}

// OVMF appends this to the kernel command line it passes as LoadOptions
// when QEMU loads the kernel and initrd itself (-kernel/-initrd).
const ovmfInitrdArg = " initrd=initrd"

// PredictPCR9 returns the value PCR 9 has after the 6.1 kernel's EFI stub
// booted with cmdline (as given to QEMU's -append) and this initrd under
// OVMF: the stub extends the LoadOptions (UTF-16LE, NUL-terminated, with
// OVMF's " initrd=initrd") and then the initrd's bytes. Nothing else
// extends PCR 9 before user space, so a key service can compute the policy
// value for a new initrd or command line without booting it.
func PredictPCR9(cmdline string, initrd []byte) []byte {
	pcr := make([]byte, sha256.Size)
	for _, d := range [][]byte{LoadOptionsDigest(cmdline), sha256Sum(initrd)} {
		pcr = sha256Sum(append(pcr, d...))
	}
	return pcr
}

// LoadOptionsDigest is the SHA-256 digest the EFI stub measures for the
// command line (the "LOADED_IMAGE::LoadOptions" event in PCR 9).
func LoadOptionsDigest(cmdline string) []byte {
	u := utf16.Encode([]rune(cmdline + ovmfInitrdArg + "\x00"))
	b := make([]byte, 2*len(u))
	for i, c := range u {
		b[2*i], b[2*i+1] = byte(c), byte(c>>8)
	}
	return sha256Sum(b)
}

func sha256Sum(b []byte) []byte {
	s := sha256.Sum256(b)
	return s[:]
}
