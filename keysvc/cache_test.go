package keysvc_test

import (
	"net/http"
	"strings"
	"testing"

	"github.com/keygate/keygate/keysvc/api"
)

// TestAdminChangesApplyAtOnce checks that an admin change reaches the very
// next unlock of a VM that has just unlocked (its parsed keys and policy
// are cached): each step changes the VM, with a challenge issued before the
// change, and the unlock right after it must see the change.
func TestAdminChangesApplyAtOnce(t *testing.T) {
	e := startEnv(t, t.TempDir())
	v := openVM(t)
	vol := setup(t, e, v, "web")
	good := v.pcrPolicy(t, 0, 7)
	// A second volume to erase, so that the VM can still be challenged for
	// the first one in the revoke step.
	e.admin(t, "POST", "/v1/admin/volumes", api.VolumeRequest{ID: "web-2", VM: "web"}, http.StatusCreated)
	for _, tc := range []struct {
		name   string
		change func()
		first  bool   // change before the challenge (a restore), not between challenge and unlock
		reason string // "" for 200
	}{
		{"warm", func() {}, false, ""},
		{"policy changed", func() {
			e.admin(t, "PUT", "/v1/admin/vms/web/policy", map[string]any{"pcrs": map[string][]string{"7": {strings.Repeat("cd", 32)}}}, http.StatusOK)
		}, false, api.ReasonPolicy},
		{"policy restored", func() { e.admin(t, "PUT", "/v1/admin/vms/web/policy", good, http.StatusOK) }, false, ""},
		{"ak replaced", func() {
			e.admin(t, "PUT", "/v1/admin/vms/web/ak", api.SetAKRequest{AKPub: randomPEM(t)}, http.StatusOK)
		}, false, api.ReasonChallenge}, // the challenge was bound to the old AK
		{"ak restored", func() { e.admin(t, "PUT", "/v1/admin/vms/web/ak", api.SetAKRequest{AKPub: v.akPEM}, http.StatusOK) }, true, ""},
		{"erased", func() { e.admin(t, "POST", "/v1/admin/volumes/web-2/erase", nil, http.StatusOK) }, false, api.ReasonErased},
		{"revoked", func() { e.admin(t, "POST", "/v1/admin/vms/web/revoke", nil, http.StatusOK) }, false, api.ReasonRevoked},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.first {
				tc.change()
			}
			target := vol
			if tc.reason == api.ReasonErased {
				target = "web-2"
			}
			ch := e.challenge(t, v, "web", target)
			att := v.quote(t, ch.Nonce)
			if !tc.first {
				tc.change()
			}
			code, body := e.vm(t, "POST", "/v1/unlock", api.UnlockRequest{Challenge: ch.Challenge, Attestation: att})
			if tc.reason == "" {
				if code != http.StatusOK {
					t.Fatalf("unlock: %d %s", code, body)
				}
				return
			}
			if tc.reason == api.ReasonPolicy { // the body is an attest.Denial
				if code != http.StatusForbidden || !strings.Contains(string(body), `"pcr":7`) {
					t.Fatalf("unlock: %d %s, want a denial naming PCR 7", code, body)
				}
				return
			}
			wantRefusal(t, code, body, tc.reason)
		})
	}
}
