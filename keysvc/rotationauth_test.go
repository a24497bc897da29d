package keysvc_test

import (
	"bytes"
	"encoding/json"
	"net/http"
	"strings"
	"testing"

	"github.com/keygate/keygate/keysvc/api"
)

// TestPendingRotationRowAuthenticated: with write access to keysvc.db but
// not the master key, putting back a pending-rotation row kept from an
// earlier rotation, forging or stripping its MAC, or deleting it releases
// no pending key and completes no rotation: the unlock gets the current
// key alone, a proof under the replayed key is refused, a critical
// store-tampered event is raised, and `keysvc audit verify` names the
// rotation. Without the row MACs the replayed row's key would be released
// as the next key, and the image moved to it.
func TestPendingRotationRowAuthenticated(t *testing.T) {
	v := openVM(t)
	for _, tc := range []struct {
		name string
		// newer starts a second rotation (generation 2) before the tampering.
		newer bool
		sql   []string
		// replayed: the pending key is the one the kept row holds.
		replayed bool
	}{
		{name: "replayed-after-cancel", replayed: true,
			sql: []string{`INSERT INTO volume_rotations SELECT * FROM kept`}},
		{name: "replayed-over-newer", newer: true, replayed: true,
			sql: []string{`DELETE FROM volume_rotations`, `INSERT INTO volume_rotations SELECT * FROM kept`}},
		{name: "replayed-as-newer-generation", newer: true, replayed: true,
			sql: []string{`DELETE FROM volume_rotations`, `INSERT INTO volume_rotations SELECT * FROM kept`, `UPDATE volume_rotations SET generation = 2`}},
		{name: "forged-mac", newer: true,
			sql: []string{`UPDATE volume_rotations SET row_mac = randomblob(32)`}},
		{name: "no-mac", newer: true,
			sql: []string{`UPDATE volume_rotations SET row_mac = NULL`}},
		{name: "row-deleted", newer: true,
			sql: []string{`DELETE FROM volume_rotations`}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			e := startEnv(t, dir)
			vol := setup(t, e, v, "rot")
			e.admin(t, "POST", "/v1/admin/volumes/"+vol+"/rotate", nil, http.StatusAccepted)
			first := e.unlockBoth(t, v, "rot", vol)
			if first.next == nil {
				t.Fatal("the pending key was not released")
			}
			e.stop(t)
			sqlExec(t, dir, nil, `CREATE TABLE kept AS SELECT * FROM volume_rotations`)
			e = startEnv(t, dir)
			// The first rotation is cancelled: released, so the cancel waits
			// for the VM, which still opens with the current key.
			var vi api.VolumeInfo
			json.Unmarshal(e.admin(t, "POST", "/v1/admin/volumes/"+vol+"/rotate/cancel", nil, http.StatusAccepted), &vi)
			if vi.Rotation != api.RotationCancelling {
				t.Fatalf("cancel answered %+v, want cancelling", vi)
			}
			r := e.unlockBoth(t, v, "rot", vol)
			if code, body := e.confirm(t, r.session, ukBytes); code != http.StatusOK || !bytes.Contains(body, []byte(api.RotationCancelled)) {
				t.Fatalf("confirm under the current key while cancelling: %d %s", code, body)
			}
			if tc.newer {
				e.admin(t, "POST", "/v1/admin/volumes/"+vol+"/rotate", nil, http.StatusAccepted)
			}
			e.stop(t)
			sqlExec(t, dir, nil, tc.sql...)

			e = startEnv(t, dir)
			got := e.unlockBoth(t, v, "rot", vol)
			if got.nextBlob || !bytes.Equal(got.uk, ukBytes) {
				t.Fatalf("unlock after tampering: next key released %v, current key %v; want the current key alone", got.nextBlob, bytes.Equal(got.uk, ukBytes))
			}
			if tc.replayed {
				code, body := e.confirm(t, got.session, first.next)
				wantRefusal(t, code, body, api.ReasonIntegrity)
			}
			var critical bool
			for _, ev := range e.listEvents(t, "severity=critical") {
				critical = critical || ev.Kind == "store-tampered" && ev.Volume == vol
			}
			if !critical {
				t.Error("no critical store-tampered event names the rotation")
			}
			var rep api.AuditVerifyResponse
			json.Unmarshal(e.admin(t, "GET", "/v1/admin/audit/verify", nil, http.StatusOK), &rep)
			if rep.OK || !strings.Contains(strings.Join(rep.Problems, "\n"), `rotation "`+vol+`"`) {
				t.Errorf("audit verify does not name the rotation: %+v", rep)
			}
			// The image still opens with the current key; the volume's own
			// key was never touched.
			if !bytes.Equal(e.unlockBoth(t, v, "rot", vol).uk, ukBytes) {
				t.Error("the current key changed")
			}
		})
	}
}
