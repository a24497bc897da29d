package keysvc_test

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/keygate/keygate/keysvc"
	"github.com/keygate/keygate/keysvc/api"
	"github.com/keygate/keygate/tpm"
)

// TestWindowClosedUnderHandSetPolicy: a policy set by hand without the
// window PCR still yields blobs bound to its reset value, so that after the
// VM extends it neither the first blob nor a second unlock gives the key.
func TestWindowClosedUnderHandSetPolicy(t *testing.T) {
	e := startEnv(t, t.TempDir())
	v := openVM(t)
	vol := setup(t, e, v, "handset") // policy on PCRs 0 and 7 only
	defer func() {
		if err := v.tpm.Reboot(); err != nil {
			t.Fatal(err)
		}
	}()

	code, body := e.unlock(t, v, "handset", vol)
	if code != http.StatusOK {
		t.Fatalf("unlock: %d %s", code, body)
	}
	var ur api.UnlockResponse
	if err := json.Unmarshal(body, &ur); err != nil {
		t.Fatal(err)
	}
	if !slices.Contains(ur.PCRs, keysvc.WindowPCR) {
		t.Fatalf("blob bound to PCRs %v, want PCR %d among them", ur.PCRs, keysvc.WindowPCR)
	}
	if err := v.tpm.Extend(keysvc.WindowPCR, []byte("unlock done")); err != nil {
		t.Fatal(err)
	}
	if _, err := v.importBlob(t, body, tpm.ECC); !errors.Is(err, tpm.ErrPCRMismatch) {
		t.Fatalf("import after the window closed: %v, want ErrPCRMismatch", err)
	}
	code, body = e.unlock(t, v, "handset", vol)
	if code != http.StatusForbidden || !strings.Contains(string(body), fmt.Sprintf(`"pcr":%d`, keysvc.WindowPCR)) {
		t.Fatalf("second unlock in one boot: %d %s, want a denial naming PCR %d", code, body, keysvc.WindowPCR)
	}
}

// TestPolicySetWindow: `policy set` stores the window binding explicitly and
// refuses a policy that would allow the post-unlock state.
func TestPolicySetWindow(t *testing.T) {
	e := startEnv(t, t.TempDir())
	v := openVM(t)
	setup(t, e, v, "pol")
	zero, other := strings.Repeat("00", 32), strings.Repeat("ab", 32)
	w := strconv.Itoa(keysvc.WindowPCR)
	for _, tc := range []struct {
		name   string
		pcrs   map[string][]string
		status int
		want   []string // stored values of the window PCR
	}{
		{"without-window", map[string][]string{"7": {other}}, http.StatusOK, []string{zero}},
		{"window-reset", map[string][]string{"7": {other}, w: {zero}}, http.StatusOK, []string{zero}},
		{"window-extended", map[string][]string{"7": {other}, w: {other}}, http.StatusBadRequest, nil},
		{"window-either", map[string][]string{"7": {other}, w: {zero, other}}, http.StatusBadRequest, nil},
		{"empty-stays-empty", map[string][]string{}, http.StatusOK, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := e.admin(t, "PUT", "/v1/admin/vms/pol/policy", map[string]any{"pcrs": tc.pcrs}, tc.status)
			if tc.status != http.StatusOK {
				if !strings.Contains(string(b), "second unlock in one boot") {
					t.Fatalf("refusal %s does not say why", b)
				}
				return
			}
			var pol struct{ PCRs map[string][]string }
			json.Unmarshal(e.admin(t, "GET", "/v1/admin/vms/pol/policy", nil, http.StatusOK), &pol)
			if !slices.Equal(pol.PCRs[w], tc.want) {
				t.Fatalf("stored PCR %s = %v, want %v", w, pol.PCRs[w], tc.want)
			}
		})
	}
}
