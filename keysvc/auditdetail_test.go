package keysvc_test

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"net/http"
	"slices"
	"strings"
	"testing"

	"github.com/keygate/keygate/keysvc/api"
	"github.com/keygate/keygate/keysvc/audit"
)

// TestAuditRecordsWhatChanged: a policy change is a "policy" record that
// holds the whole canonical policy (event-log rules included), its hash and
// the diff from the previous one; a volume made by an administrator is a
// "volume" record naming its VM, whether the key was made or imported, and
// the EK it is bound to.
func TestAuditRecordsWhatChanged(t *testing.T) {
	e := startEnv(t, t.TempDir())
	v := openVM(t)
	e.admin(t, "POST", "/v1/admin/vms", api.EnrollRequest{Name: "p", EKPub: v.ekPEM, AKPub: v.akPEM}, http.StatusCreated)
	a, b := strings.Repeat("aa", 32), strings.Repeat("bb", 32)
	e.admin(t, "PUT", "/v1/admin/vms/p/policy", map[string]any{"pcrs": map[string][]string{"7": {a}}}, http.StatusOK)
	stored := bytes.TrimSpace(e.admin(t, "PUT", "/v1/admin/vms/p/policy", map[string]any{"pcrs": map[string][]string{"7": {b}, "4": {a}},
		"secure_boot": true, "kernel_cmdline": map[string]any{"contains": []string{"lockdown=integrity"}}}, http.StatusOK))
	e.admin(t, "POST", "/v1/admin/volumes", api.VolumeRequest{ID: "made", VM: "p"}, http.StatusCreated)
	e.admin(t, "POST", "/v1/admin/volumes", api.VolumeRequest{ID: "brought", VM: "p", Key: ukBytes}, http.StatusCreated)

	var recs []audit.Record
	json.Unmarshal(e.admin(t, "GET", "/v1/admin/audit", nil, http.StatusOK), &recs)
	var pols []audit.Policy
	vols := map[string]audit.Volume{}
	for _, r := range recs {
		switch r.Action {
		case audit.ActionPolicy:
			var p audit.Policy
			if err := json.Unmarshal(r.Details, &p); err != nil {
				t.Fatal(err)
			}
			pols = append(pols, p)
		case audit.ActionVolume:
			var d audit.Volume
			json.Unmarshal(r.Details, &d)
			vols[r.Subject] = d
		}
	}
	if len(pols) != 2 {
		t.Fatalf("%d policy records, want 2", len(pols))
	}
	last := pols[1]
	sum := sha256.Sum256(stored)
	for _, tc := range []struct {
		name string
		ok   bool
	}{
		{"whole policy recorded as stored", string(last.Policy) == string(stored)},
		{"event-log rules recorded", strings.Contains(string(last.Policy), "lockdown=integrity") && strings.Contains(string(last.Policy), `"secure_boot":true`)},
		{"hash of the stored policy", last.SHA256 == hex.EncodeToString(sum[:])},
		{"previous hash chains", last.PrevSHA256 == pols[0].SHA256},
		{"diff names removed value", slices.Contains(last.Changes, "pcr 7: - "+a)},
		{"diff names added values", slices.Contains(last.Changes, "pcr 7: + "+b) && slices.Contains(last.Changes, "pcr 4: + "+a)},
		{"diff names rule changes", slices.Contains(last.Changes, "secure_boot: null -> true") && slices.ContainsFunc(last.Changes, func(s string) bool { return strings.HasPrefix(s, "kernel_cmdline: null -> ") })},
		{"created volume", vols["made"].Source == "created" && vols["made"].VM == "p" && len(vols["made"].EKFingerprint) == 64},
		{"imported volume", vols["brought"].Source == "imported" && vols["brought"].VM == "p"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if !tc.ok {
				b, _ := json.Marshal(map[string]any{"policy": pols, "volume": vols})
				t.Errorf("records: %s", b)
			}
		})
	}
}
