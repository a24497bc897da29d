package keysvc_test

import (
	"bytes"
	"encoding/json"
	"net/http"
	"slices"
	"testing"

	"github.com/keygate/keygate/keysvc/api"
	"github.com/keygate/keygate/keysvc/audit"
)

// TestRotateCancel: a cancel before the pending key was released destroys
// it at once; after, it waits for the VM, whose confirmation under the
// current key ends the cancel and under the pending key completes the
// rotation; nothing pending is a 409. Each step is on the audit chain, the
// chain and the rows verify, and the volume lists the state.
func TestRotateCancel(t *testing.T) {
	v := openVM(t)
	for _, tc := range []struct {
		name    string
		release bool   // an unlock released the pending key before the cancel
		keep    string // which key the VM confirms with: "current" or "pending"
		steps   []string
	}{
		{name: "before-release", steps: []string{"started", "cancelled"}},
		{name: "after-release-vm-keeps-current", release: true, keep: "current", steps: []string{"started", "cancel-requested", "cancelled"}},
		{name: "after-release-vm-moved", release: true, keep: "pending", steps: []string{"started", "cancel-requested", "completed-despite-cancel"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := startEnv(t, t.TempDir())
			vol := setup(t, e, v, "cx")
			e.admin(t, "POST", "/v1/admin/volumes/"+vol+"/rotate/cancel", nil, http.StatusConflict)
			e.admin(t, "POST", "/v1/admin/volumes/"+vol+"/rotate", nil, http.StatusAccepted)
			var pending []byte
			if tc.release {
				pending = e.unlockBoth(t, v, "cx", vol).next
			}
			want, wantCode := "", http.StatusOK
			if tc.release {
				want, wantCode = api.RotationCancelling, http.StatusAccepted
			}
			var vi api.VolumeInfo
			json.Unmarshal(e.admin(t, "POST", "/v1/admin/volumes/"+vol+"/rotate/cancel", nil, wantCode), &vi)
			if vi.Rotation != want || e.volumeInfo(t, vol).Rotation != want {
				t.Fatalf("after cancel the volume shows %q (listed %q), want %q", vi.Rotation, e.volumeInfo(t, vol).Rotation, want)
			}
			if tc.release {
				// Repeated: still waiting, nothing new recorded.
				e.admin(t, "POST", "/v1/admin/volumes/"+vol+"/rotate/cancel", nil, http.StatusAccepted)
				ur := e.unlocked(t, v, "cx", vol)
				if !ur.RotationCancelling || ur.NextImportBlob == nil {
					t.Fatalf("unlock while cancelling: cancelling %v, next blob %v; want both", ur.RotationCancelling, ur.NextImportBlob != nil)
				}
				r := e.unlockBoth(t, v, "cx", vol)
				if !bytes.Equal(r.next, pending) {
					t.Fatal("the pending key changed while cancelling")
				}
				uk, answer := ukBytes, api.RotationCancelled
				if tc.keep == "pending" {
					uk, answer = pending, api.RotationDone
				}
				if code, body := e.confirm(t, r.session, uk); code != http.StatusOK || !bytes.Contains(body, []byte(`"`+answer+`"`)) {
					t.Fatalf("confirm with the %s key: %d %s, want %s", tc.keep, code, body, answer)
				}
			}
			after := e.unlockBoth(t, v, "cx", vol)
			wantUK := ukBytes
			if tc.keep == "pending" {
				wantUK = pending
			}
			if after.nextBlob || !bytes.Equal(after.uk, wantUK) || e.volumeInfo(t, vol).Rotation != "" {
				t.Fatalf("after the cancel: next blob %v, key kept %v", after.nextBlob, bytes.Equal(after.uk, wantUK))
			}
			var steps []string
			for _, r := range e.auditOf(t, audit.ActionRotate) {
				var d audit.Rotate
				json.Unmarshal(r.Details, &d)
				steps = append(steps, d.Step)
				if d.Generation != 1 {
					t.Errorf("record %s names generation %d, want 1", d.Step, d.Generation)
				}
			}
			if !slices.Equal(steps, tc.steps) {
				t.Fatalf("rotate records %v, want %v", steps, tc.steps)
			}
			if rep := e.admin(t, "GET", "/v1/admin/audit/verify", nil, http.StatusOK); !bytes.Contains(rep, []byte(`"ok":true`)) {
				t.Fatalf("audit verify after the cancel: %s", rep)
			}
			// The volume rotates again, in the next generation.
			e.admin(t, "POST", "/v1/admin/volumes/"+vol+"/rotate", nil, http.StatusAccepted)
			if r := e.unlockBoth(t, v, "cx", vol); r.next == nil || bytes.Equal(r.next, pending) {
				t.Fatal("a new rotation after the cancel releases no new pending key")
			}
		})
	}
}
