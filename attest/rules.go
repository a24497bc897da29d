package attest

import (
	"bytes"
	"crypto/sha256"
	"fmt"
	"strconv"
	"strings"

	pb "github.com/google/go-tpm-tools/proto/attest"
)

// Rule names, as they appear in RuleFailure.Rule.
const (
	RuleSecureBoot     = "secure_boot"
	RuleCmdlineEquals  = "kernel_cmdline.equals"
	RuleCmdlineContain = "kernel_cmdline.contains"
)

const (
	evIPL          = 0x0000000D // EV_IPL
	cmdlinePCR     = 8          // GRUB measures its commands into PCR 8
	noLogGot       = "no UEFI event log in the attestation (send the firmware event log with the quote)"
	notMeasuredGot = "no kernel command line measured in PCR 8 (rules on the command line need a GRUB boot that measures it)"
)

// GRUB's prefixes for the kernel command line event; see
// https://www.gnu.org/software/grub/manual/grub/grub.html#Measured-Boot.
var cmdlinePrefixes = [][]byte{[]byte("kernel_cmdline: "), []byte("grub_kernel_cmdline ")}

// evalRules checks the policy's event-log rules against the verified
// machine state. ms comes from server.VerifyAttestation, which kept only
// events whose PCRs replayed to the quoted values.
func evalRules(p *Policy, att *pb.Attestation, ms *pb.MachineState) []RuleFailure {
	if p == nil || (p.SecureBoot == nil && p.KernelCmdline == nil) {
		return nil
	}
	hasLog := len(att.GetEventLog()) > 0
	var out []RuleFailure
	if p.SecureBoot != nil {
		want := onOff(*p.SecureBoot)
		switch {
		case !hasLog:
			out = append(out, RuleFailure{RuleSecureBoot, want, noLogGot})
		case ms.GetSecureBoot() == nil:
			out = append(out, RuleFailure{RuleSecureBoot, want, "Secure Boot state not found in the event log"})
		case ms.GetSecureBoot().GetEnabled() != *p.SecureBoot:
			out = append(out, RuleFailure{RuleSecureBoot, want, onOff(ms.GetSecureBoot().GetEnabled())})
		}
	}
	if r := p.KernelCmdline; r != nil {
		var cmdline, why string
		if !hasLog {
			why = noLogGot
		} else {
			cmdline, why = measuredCmdline(ms)
		}
		if r.Equals != "" {
			switch {
			case why != "":
				out = append(out, RuleFailure{RuleCmdlineEquals, strconv.Quote(r.Equals), why})
			case cmdline != r.Equals:
				out = append(out, RuleFailure{RuleCmdlineEquals, strconv.Quote(r.Equals), strconv.Quote(cmdline)})
			}
		}
		if len(r.Contains) > 0 {
			words := strings.Fields(cmdline)
			var missing []string
			for _, w := range r.Contains {
				if !contains(words, w) {
					missing = append(missing, w)
				}
			}
			switch {
			case why != "":
				out = append(out, RuleFailure{RuleCmdlineContain, strings.Join(r.Contains, " "), why})
			case len(missing) > 0:
				out = append(out, RuleFailure{RuleCmdlineContain, strings.Join(r.Contains, " "),
					fmt.Sprintf("%q (missing %s)", cmdline, strings.Join(missing, " "))})
			}
		}
	}
	return out
}

// measuredCmdline finds the one kernel command line GRUB measured into PCR
// 8 whose event digest is the SHA-256 of the command line (so the text is
// what was measured, not just what the log claims). why is non-empty when
// there is none or more than one.
func measuredCmdline(ms *pb.MachineState) (cmdline, why string) {
	found := 0
	for _, e := range ms.GetRawEvents() {
		if e.GetPcrIndex() != cmdlinePCR || e.GetUntrustedType() != evIPL {
			continue
		}
		data := e.GetData()
		for _, pfx := range cmdlinePrefixes {
			if !bytes.HasPrefix(data, pfx) {
				continue
			}
			s := data[len(pfx):]
			if !digestOf(e.GetDigest(), s) && !(len(s) > 0 && s[len(s)-1] == 0 && digestOf(e.GetDigest(), s[:len(s)-1])) {
				return "", "kernel command line event in PCR 8 does not match its digest"
			}
			cmdline = string(bytes.TrimSuffix(s, []byte{0}))
			found++
			break
		}
	}
	switch found {
	case 0:
		return "", notMeasuredGot
	case 1:
		return cmdline, ""
	default:
		return "", fmt.Sprintf("%d kernel command lines measured in PCR 8; want exactly one", found)
	}
}

func digestOf(digest, data []byte) bool {
	sum := sha256.Sum256(data)
	return bytes.Equal(digest, sum[:])
}

func contains(words []string, w string) bool {
	for _, x := range words {
		if x == w {
			return true
		}
	}
	return false
}

func onOff(b bool) string {
	if b {
		return "enabled"
	}
	return "disabled"
}
