package keysvc_test

import (
	"bytes"
	"database/sql"
	"encoding/json"
	"net/http"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/keygate/keygate/keysvc/api"
	"github.com/keygate/keygate/keysvc/store"
)

// sqlExec runs statements on the stopped service's database file, as
// someone with write access to it (and without the master key) would.
func sqlExec(t *testing.T, dir string, args map[string]any, qs ...string) {
	t.Helper()
	db, err := sql.Open("sqlite", filepath.Join(dir, store.DBFile))
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	var named []any
	for k, v := range args {
		named = append(named, sql.Named(k, v))
	}
	for _, q := range qs {
		if _, err := db.Exec(q, named...); err != nil {
			t.Fatalf("%s: %v", q, err)
		}
	}
}

// TestDatabaseWriteReleasesNothing: with write access to keysvc.db but not
// the master key, pointing a VM's or a volume's row at another TPM (the
// attacker's, which is enrolled too, so its rows are genuine) releases
// nothing: the row MACs and the sealed UK's binding refuse it, a critical
// event is raised, and `keysvc audit verify` names the row.
func TestDatabaseWriteReleasesNothing(t *testing.T) {
	victim := openVM(t)
	mallory := victim.asMallory(t)
	if victim.ekPEM == mallory.ekPEM || victim.akPEM == mallory.akPEM {
		t.Fatal("mallory's keys are the victim's; the test needs two sets")
	}
	for _, tc := range []struct {
		name string
		sql  []string
		// The attacker's attempt: as VM name, for volume, with which TPM.
		vm, vol      string
		useVictimTPM bool
		revoke       bool
		names        string // what audit verify must name ("" for nothing: the row itself is genuine)
	}{
		{name: "swap-ek-ak-policy", vm: "victim", vol: "victim-vol", names: `vm "victim"`,
			sql: []string{`UPDATE vms SET (ek_pub_pem, ak_pub_pem, policy_json) = (SELECT ek_pub_pem, ak_pub_pem, policy_json FROM vms WHERE name = 'mallory') WHERE name = 'victim'`}},
		{name: "swap-row-with-its-mac", vm: "victim", vol: "victim-vol", names: `vm "victim"`,
			sql: []string{`UPDATE vms SET (ek_pub_pem, ak_pub_pem, policy_json, row_mac) = (SELECT ek_pub_pem, ak_pub_pem, policy_json, row_mac FROM vms WHERE name = 'mallory') WHERE name = 'victim'`}},
		{name: "swap-and-strip-mac", vm: "victim", vol: "victim-vol", names: `vm "victim"`,
			sql: []string{`UPDATE vms SET (ek_pub_pem, ak_pub_pem, policy_json, row_mac) = (SELECT ek_pub_pem, ak_pub_pem, policy_json, NULL FROM vms WHERE name = 'mallory') WHERE name = 'victim'`}},
		{name: "reassign-volume", vm: "mallory", vol: "victim-vol", names: `volume "victim-vol"`,
			sql: []string{`UPDATE volumes SET vm = 'mallory' WHERE id = 'victim-vol'`}},
		{name: "move-sealed-uk", vm: "mallory", vol: "mallory-vol",
			sql: []string{`UPDATE volumes SET sealed_uk = (SELECT sealed_uk FROM volumes WHERE id = 'victim-vol') WHERE id = 'mallory-vol'`}},
		{name: "un-revoke", vm: "victim", vol: "victim-vol", useVictimTPM: true, revoke: true, names: `vm "victim"`,
			sql: []string{`UPDATE vms SET revoked = 0 WHERE name = 'victim'`}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			e := startEnv(t, dir)
			setup(t, e, victim, "victim")
			e.admin(t, "POST", "/v1/admin/vms", api.EnrollRequest{Name: "mallory", EKPub: mallory.ekPEM, AKPub: mallory.akPEM}, http.StatusCreated)
			e.admin(t, "POST", "/v1/admin/volumes", api.VolumeRequest{ID: "mallory-vol", VM: "mallory", Key: bytes.Repeat([]byte{0x11}, 32)}, http.StatusCreated)
			e.admin(t, "PUT", "/v1/admin/vms/mallory/policy", mallory.pcrPolicy(t, 0, 7), http.StatusOK)
			if tc.revoke {
				e.admin(t, "POST", "/v1/admin/vms/victim/revoke", nil, http.StatusOK)
			}
			e.stop(t)
			sqlExec(t, dir, nil, tc.sql...)

			e = startEnv(t, dir)
			tpm := mallory
			if tc.useVictimTPM {
				tpm = victim
			}
			code, body := e.vm(t, "POST", "/v1/challenge", api.ChallengeRequest{VM: tc.vm, Volume: tc.vol, EKPub: tpm.ekPEM, AKPub: tpm.akPEM})
			if code == http.StatusOK {
				var ch api.ChallengeResponse
				json.Unmarshal(body, &ch)
				tpm.ca = e.ca
				code, body = e.vm(t, "POST", "/v1/unlock", api.UnlockRequest{Challenge: ch.Challenge, Attestation: tpm.quote(t, ch.Nonce)})
			}
			wantRefusal(t, code, body, api.ReasonIntegrity)

			var critical bool
			for _, ev := range e.listEvents(t, "severity=critical") {
				critical = critical || ev.Kind == "store-tampered"
			}
			if !critical {
				t.Error("no critical store-tampered event was raised")
			}
			var vms []api.VMInfo
			json.Unmarshal(e.admin(t, "GET", "/v1/admin/vms", nil, http.StatusOK), &vms)
			var vols []api.VolumeInfo
			json.Unmarshal(e.admin(t, "GET", "/v1/admin/volumes", nil, http.StatusOK), &vols)
			var flagged []string
			for _, v := range vms {
				if v.Tampered != "" {
					flagged = append(flagged, `vm "`+v.Name+`"`)
				}
			}
			for _, v := range vols {
				if v.Tampered != "" {
					flagged = append(flagged, `volume "`+v.ID+`"`)
				}
			}
			if tc.names != "" && !slices.Contains(flagged, tc.names) {
				t.Errorf("the admin lists flag %v, want %s among them", flagged, tc.names)
			}
			var rep api.AuditVerifyResponse
			json.Unmarshal(e.admin(t, "GET", "/v1/admin/audit/verify", nil, http.StatusOK), &rep)
			all := strings.Join(rep.Problems, "\n")
			if tc.names != "" && (rep.OK || !strings.Contains(all, tc.names)) {
				t.Errorf("audit verify does not name %s: %+v", tc.names, rep)
			}
			if !strings.Contains(auditText(t, e), `"Action":"tamper"`) {
				t.Error("no tamper record in the audit chain")
			}
		})
	}
}

// auditText is the audit chain as the admin API lists it.
func auditText(t *testing.T, e *env) string {
	return string(e.admin(t, "GET", "/v1/admin/audit", nil, http.StatusOK))
}

// TestTamperedRowNotLaundered: an administrator's change to a tampered row
// is refused, rather than re-MAC'ing what someone else wrote.
func TestTamperedRowNotLaundered(t *testing.T) {
	dir := t.TempDir()
	e := startEnv(t, dir)
	v := openVM(t)
	setup(t, e, v, "victim")
	e.stop(t)
	sqlExec(t, dir, map[string]any{"ek": randomPEM(t)}, `UPDATE vms SET ek_pub_pem = :ek WHERE name = 'victim'`)
	e = startEnv(t, dir)
	for _, c := range []struct{ method, path string }{
		{"PUT", "/v1/admin/vms/victim/policy"},
		{"POST", "/v1/admin/vms/victim/policy/learn"},
	} {
		var body any
		if c.method == "PUT" {
			body = v.pcrPolicy(t, 0, 7)
		}
		b := e.admin(t, c.method, c.path, body, http.StatusConflict)
		if !strings.Contains(string(b), "audit verify") {
			t.Errorf("%s %s: %s, want a hint naming `keysvc audit verify`", c.method, c.path, b)
		}
	}
}
