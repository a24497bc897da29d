package keysvc

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"maps"

	"github.com/keygate/keygate/attest"
)

// The release window (issue 12, item 1). A VM extends WindowPCR right after
// it imports its key, so that nothing later in the same boot can import a
// blob again. That works only if every blob is bound to WindowPCR's reset
// value: a blob bound to the boot PCRs alone imports just as well after the
// extend, and anyone in the VM who reaches the TPM could run challenge,
// quote, unlock and Import again and read the UK in plaintext.
//
// So the service binds WindowPCR = its reset value (all zeros) into every
// verification and every release, whatever the stored policy says, rather
// than refusing policies that lack it: policies stored before this rule (by
// `policy set`, or learned with a narrower WithLearnPCRs) are then closed
// too, with no operator action. A policy that names WindowPCR with any other
// value would allow the post-unlock state, and is refused when it is set.

// windowReset is WindowPCR's value at boot, before any unlock.
var windowReset = make([]byte, attest.PCRSize)

// errWindowPolicy is wrapped by checkWindowPolicy's error.
var errWindowPolicy = errors.New("policy would allow a second unlock in one boot")

// checkWindowPolicy refuses a policy that allows WindowPCR any value other
// than its reset value.
func checkWindowPolicy(p *attest.Policy) error {
	for _, v := range p.PCRs[WindowPCR] {
		if !bytes.Equal(v, windowReset) {
			return fmt.Errorf("%w: PCR %d may only hold its reset value %x (keygate extends it right after each unlock, and a key released in that state could be imported again by anything running later in the boot); drop PCR %d from the policy, the service binds it to the reset value itself",
				errWindowPolicy, WindowPCR, windowReset, WindowPCR)
		}
	}
	return nil
}

// withWindow returns p with WindowPCR bound to its reset value. An empty
// PCR set stays empty (Verify denies it: binding WindowPCR alone would
// release to any boot). p is not modified; the result may share its
// value slices and must not be modified either.
func withWindow(p *attest.Policy) *attest.Policy {
	if len(p.PCRs) == 0 {
		return p
	}
	if vals, ok := p.PCRs[WindowPCR]; ok && len(vals) == 1 && bytes.Equal(vals[0], windowReset) {
		return p
	}
	q := *p
	q.PCRs = maps.Clone(p.PCRs)
	q.PCRs[WindowPCR] = [][]byte{windowReset}
	return &q
}

// releasePolicyCache holds parsed stored policies with the window bound, so
// that the hot path neither parses nor copies a policy per unlock.
var releasePolicyCache = newParseCache[*attest.Policy](16384, 32<<20, 64<<10)

// releasePolicy is what an unlock verifies against and binds the blob to:
// the VM's stored policy ("{}" if empty) with WindowPCR bound (withWindow).
// The result is shared: read it, never change it.
func releasePolicy(raw json.RawMessage) (*attest.Policy, error) {
	if len(raw) == 0 {
		raw = json.RawMessage("{}")
	}
	return releasePolicyCache.get(raw, func(b []byte) (*attest.Policy, error) {
		p, err := attest.ParsePolicy(b)
		if err != nil {
			return nil, err
		}
		return withWindow(p), nil
	})
}
