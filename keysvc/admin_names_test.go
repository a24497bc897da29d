package keysvc_test

import (
	"net/http"
	"strings"
	"testing"

	"github.com/keygate/keygate/keysvc/api"
)

// TestAdminRefusesBadNames: a VM name or volume ID the store cannot key on
// is the admin's mistake (400, saying which characters to use), not a store
// failure (500), and nothing is created.
func TestAdminRefusesBadNames(t *testing.T) {
	e := startEnv(t, t.TempDir())
	v := openVM(t)
	setup(t, e, v, "owner")
	for _, tc := range []struct {
		name, path string
		body       any
		want       string
	}{
		{"vm name with a quote", "/v1/admin/vms", api.EnrollRequest{Name: "web'1", EKPub: v.ekPEM}, "may contain only"},
		{"vm name with a slash", "/v1/admin/vms", api.EnrollRequest{Name: "a/b", EKPub: v.ekPEM}, "may contain only"},
		{"vm name too long", "/v1/admin/vms", api.EnrollRequest{Name: strings.Repeat("a", 129), EKPub: v.ekPEM}, "1 to 128"},
		{"empty vm name", "/v1/admin/vms", api.EnrollRequest{EKPub: v.ekPEM}, "1 to 128"},
		{"volume id with a quote", "/v1/admin/volumes", api.VolumeRequest{ID: "d'1", VM: "owner"}, "may contain only"},
		{"volume id of 200 bytes", "/v1/admin/volumes", api.VolumeRequest{ID: strings.Repeat("v", 200), VM: "owner"}, "1 to 128"},
		{"volume without vm", "/v1/admin/volumes", api.VolumeRequest{ID: "ok"}, "vm is required"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := e.admin(t, "POST", tc.path, tc.body, http.StatusBadRequest)
			if !strings.Contains(string(b), tc.want) || !strings.Contains(string(b), "letters, digits") && tc.want != "vm is required" {
				t.Errorf("answer %s, want it to say %q and which characters to use", b, tc.want)
			}
		})
	}
	t.Run("provisioning a volume id no store takes", func(t *testing.T) {
		prov := v.asMallory(t)
		e.admin(t, "POST", "/v1/admin/vms", api.EnrollRequest{Name: "prov", EKPub: prov.ekPEM, AKPub: prov.akPEM, ProvisioningAllowed: true}, http.StatusCreated)
		code, b := e.vm(t, "POST", "/v1/challenge", api.ChallengeRequest{VM: "prov", Volume: "new'vol", EKPub: prov.ekPEM, AKPub: prov.akPEM})
		if code != http.StatusForbidden || !strings.Contains(string(b), api.ReasonUnknownVolume) || !strings.Contains(string(b), "may contain only") {
			t.Errorf("challenge: %d %s, want 403 unknown-volume naming the rule", code, b)
		}
		code, b = e.vm(t, "POST", "/v1/challenge", api.ChallengeRequest{VM: "prov", Volume: "new-vol", EKPub: prov.ekPEM, AKPub: prov.akPEM})
		if code != http.StatusOK {
			t.Errorf("challenge for a good new id: %d %s, want 200 (provisioning allowed)", code, b)
		}
	})
	if b := e.admin(t, "GET", "/v1/admin/volumes", nil, http.StatusOK); strings.Contains(string(b), "d'1") {
		t.Errorf("a refused volume was stored: %s", b)
	}
	// 128 characters of the allowed set are a good name.
	setup(t, e, v, strings.Repeat("n", 124))
}
