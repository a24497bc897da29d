package keysvc

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"slices"

	"github.com/keygate/keygate/attest"
	"github.com/keygate/keygate/keysvc/audit"
)

// policyChange is the audit record of a policy change from prev to next
// (both as stored): the whole new policy, both hashes, and one line per
// difference, event-log rules included, so that the chain alone says what
// every unlock was held to from then on.
func policyChange(prev, next json.RawMessage) audit.Policy {
	if len(prev) == 0 {
		prev = json.RawMessage("{}")
	}
	ph, nh := sha256.Sum256(prev), sha256.Sum256(next)
	out := audit.Policy{Policy: next, SHA256: hex.EncodeToString(nh[:]), PrevSHA256: hex.EncodeToString(ph[:])}
	a, err1 := attest.ParsePolicy(prev)
	b, err2 := attest.ParsePolicy(next)
	if err1 != nil || err2 != nil {
		out.Changes = []string{"previous policy does not parse; the whole new policy is recorded"}
		return out
	}
	idx := map[int]bool{}
	for i := range a.PCRs {
		idx[i] = true
	}
	for i := range b.PCRs {
		idx[i] = true
	}
	keys := make([]int, 0, len(idx))
	for i := range idx {
		keys = append(keys, i)
	}
	slices.Sort(keys)
	has := func(set [][]byte, v []byte) bool {
		return slices.ContainsFunc(set, func(u []byte) bool { return string(u) == string(v) })
	}
	for _, i := range keys {
		for _, v := range a.PCRs[i] {
			if !has(b.PCRs[i], v) {
				out.Changes = append(out.Changes, fmt.Sprintf("pcr %d: - %x", i, v))
			}
		}
		for _, v := range b.PCRs[i] {
			if !has(a.PCRs[i], v) {
				out.Changes = append(out.Changes, fmt.Sprintf("pcr %d: + %x", i, v))
			}
		}
	}
	if sa, sb := jsonText(a.SecureBoot), jsonText(b.SecureBoot); sa != sb {
		out.Changes = append(out.Changes, fmt.Sprintf("secure_boot: %s -> %s", sa, sb))
	}
	if ka, kb := jsonText(a.KernelCmdline), jsonText(b.KernelCmdline); ka != kb {
		out.Changes = append(out.Changes, fmt.Sprintf("kernel_cmdline: %s -> %s", ka, kb))
	}
	return out
}

// jsonText is v as JSON ("null" for a nil pointer: the rule is absent).
func jsonText(v any) string {
	b, _ := json.Marshal(v)
	return string(b)
}
