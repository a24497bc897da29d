package keysvc_test

import (
	"bytes"
	"encoding/json"
	"errors"
	"net/http"
	"sync/atomic"
	"testing"

	tpmpb "github.com/google/go-tpm-tools/proto/tpm"
	"google.golang.org/protobuf/proto"

	"github.com/keygate/keygate/keysvc"
	"github.com/keygate/keygate/keysvc/api"
	"github.com/keygate/keygate/keysvc/audit"
	"github.com/keygate/keygate/tpm"
)

// released is what one unlock gave the VM: the session, and the UKs its
// TPM imported (next is nil when no rotation is pending).
type released struct {
	session  string
	uk, next []byte
	nextBlob bool
}

// unlocked unlocks and fails the test unless the key is released.
func (e *env) unlocked(t *testing.T, v *vmTPM, name, vol string) api.UnlockResponse {
	t.Helper()
	code, body := e.unlock(t, v, name, vol)
	if code != http.StatusOK {
		t.Fatalf("unlock: %d %s", code, body)
	}
	var ur api.UnlockResponse
	if err := json.Unmarshal(body, &ur); err != nil {
		t.Fatal(err)
	}
	return ur
}

// unlockBoth unlocks and imports both blobs.
func (e *env) unlockBoth(t *testing.T, v *vmTPM, name, vol string) released {
	t.Helper()
	ur := e.unlocked(t, v, name, vol)
	r := released{session: ur.Session, nextBlob: ur.NextImportBlob != nil}
	r.uk = importRaw(t, v, ur.ImportBlob)
	if ur.NextImportBlob != nil {
		r.next = importRaw(t, v, ur.NextImportBlob)
	}
	return r
}

func importRaw(t *testing.T, v *vmTPM, raw []byte) []byte {
	t.Helper()
	blob := &tpmpb.ImportBlob{}
	if err := proto.Unmarshal(raw, blob); err != nil {
		t.Fatal(err)
	}
	buf, err := v.tpm.Import(blob, tpm.ECC)
	if err != nil {
		t.Fatalf("import: %v", err)
	}
	defer buf.Destroy()
	return bytes.Clone(buf.Bytes())
}

// confirm posts a rotation proof under uk for the session.
func (e *env) confirm(t *testing.T, session string, uk []byte) (int, []byte) {
	t.Helper()
	return e.do(t, "POST", "https://"+e.svc.VMAddr()+"/v1/rotate", session, api.RotateConfirmRequest{Proof: api.RotateProof(uk, session)})
}

func (e *env) volumeInfo(t *testing.T, id string) api.VolumeInfo {
	t.Helper()
	var vi api.VolumeInfo
	if err := json.Unmarshal(e.admin(t, "GET", "/v1/admin/volumes/"+id, nil, http.StatusOK), &vi); err != nil {
		t.Fatal(err)
	}
	return vi
}

// auditOf returns the records of action.
func (e *env) auditOf(t *testing.T, action audit.Action) []audit.Record {
	t.Helper()
	var recs []audit.Record
	json.Unmarshal(e.admin(t, "GET", "/v1/admin/audit", nil, http.StatusOK), &recs)
	var out []audit.Record
	for _, r := range recs {
		if r.Action == action {
			out = append(out, r)
		}
	}
	return out
}

// TestRotate walks a rotation through the VM API: both keys released while
// it is pending, a wrong proof refused, the right one destroying the old
// key, and every step on the audit chain.
func TestRotate(t *testing.T) {
	e := startEnv(t, t.TempDir())
	v := openVM(t)
	vol := setup(t, e, v, "rot")

	before := e.unlockBoth(t, v, "rot", vol)
	if before.nextBlob || !bytes.Equal(before.uk, ukBytes) {
		t.Fatalf("before rotation: next blob %v, uk is the imported one %v", before.nextBlob, bytes.Equal(before.uk, ukBytes))
	}
	if code, _ := e.confirm(t, before.session, ukBytes); code != http.StatusOK {
		// The proof is under the current key and nothing is pending: a
		// repeated confirmation of a finished rotation.
		t.Fatalf("confirm under the current key with nothing pending: %d, want 200 done", code)
	}
	if code, body := e.confirm(t, before.session, bytes.Repeat([]byte{1}, 32)); code != http.StatusConflict {
		t.Fatalf("confirm with nothing pending: %d %s, want 409", code, body)
	}

	var vi api.VolumeInfo
	json.Unmarshal(e.admin(t, "POST", "/v1/admin/volumes/"+vol+"/rotate", nil, http.StatusAccepted), &vi)
	if vi.Rotation != api.RotationPending || vi.RotationStarted == nil {
		t.Fatalf("rotate answered %+v, want rotation pending", vi)
	}
	e.admin(t, "POST", "/v1/admin/volumes/"+vol+"/rotate", nil, http.StatusConflict)
	var list []api.VolumeInfo
	json.Unmarshal(e.admin(t, "GET", "/v1/admin/volumes?vm=rot", nil, http.StatusOK), &list)
	if len(list) != 1 || list[0].Rotation != api.RotationPending {
		t.Fatalf("volume list: %+v, want the rotation pending", list)
	}

	during := e.unlockBoth(t, v, "rot", vol)
	if !bytes.Equal(during.uk, ukBytes) || len(during.next) != api.UKSize || bytes.Equal(during.next, ukBytes) {
		t.Fatalf("during rotation: current is the old key %v, pending is a new %d-byte key", bytes.Equal(during.uk, ukBytes), len(during.next))
	}
	for _, tc := range []struct {
		name    string
		session string
		uk      []byte
		want    int
	}{
		{"old-key", during.session, during.uk, http.StatusForbidden},
		{"other-session", before.session + "x", during.next, http.StatusUnauthorized},
		{"no-session", "", during.next, http.StatusUnauthorized},
	} {
		t.Run("refuses-"+tc.name, func(t *testing.T) {
			code, body := e.do(t, "POST", "https://"+e.svc.VMAddr()+"/v1/rotate", tc.session, api.RotateConfirmRequest{Proof: api.RotateProof(tc.uk, during.session)})
			if code != tc.want {
				t.Fatalf("%d %s, want %d", code, body, tc.want)
			}
			if code == http.StatusForbidden {
				wantRefusal(t, code, body, api.ReasonRotateProof)
			}
		})
	}
	// A proof made for another session does not carry over.
	code, _ := e.do(t, "POST", "https://"+e.svc.VMAddr()+"/v1/rotate", during.session, api.RotateConfirmRequest{Proof: api.RotateProof(during.next, before.session)})
	if code != http.StatusForbidden {
		t.Fatalf("proof bound to another session: %d, want 403", code)
	}
	if e.volumeInfo(t, vol).Rotation != api.RotationPending {
		t.Fatal("a refused proof ended the rotation")
	}

	if code, body := e.confirm(t, during.session, during.next); code != http.StatusOK || !bytes.Contains(body, []byte(`"done"`)) {
		t.Fatalf("confirm: %d %s", code, body)
	}
	if code, body := e.confirm(t, during.session, during.next); code != http.StatusOK {
		t.Fatalf("repeated confirm: %d %s, want 200 done", code, body)
	}
	if vi := e.volumeInfo(t, vol); vi.Rotation != "" {
		t.Fatalf("after confirm the volume shows rotation %q", vi.Rotation)
	}
	after := e.unlockBoth(t, v, "rot", vol)
	if after.nextBlob || !bytes.Equal(after.uk, during.next) {
		t.Fatalf("after rotation: next blob %v, current is the proven key %v", after.nextBlob, bytes.Equal(after.uk, during.next))
	}

	steps := []string{}
	for _, r := range e.auditOf(t, audit.ActionRotate) {
		var d audit.Rotate
		json.Unmarshal(r.Details, &d)
		steps = append(steps, d.Step)
		if d.Step == "completed" && (d.SessionID == "" || r.Actor != "vm:rot") {
			t.Errorf("completed record %+v by %s, want the session and the VM", d, r.Actor)
		}
	}
	if len(steps) != 2 || steps[0] != "started" || steps[1] != "completed" {
		t.Fatalf("rotate records %v, want started, completed", steps)
	}
	nextKey := 0
	for _, r := range e.auditOf(t, audit.ActionUnlock) {
		var d audit.Unlock
		json.Unmarshal(r.Details, &d)
		if d.NextKey {
			nextKey++
		}
	}
	if nextKey != 1 {
		t.Fatalf("%d unlock records mark the pending key released, want 1", nextKey)
	}
	if rep := e.admin(t, "GET", "/v1/admin/audit/verify", nil, http.StatusOK); !bytes.Contains(rep, []byte(`"ok":true`)) {
		t.Fatalf("audit verify: %s", rep)
	}
}

// TestRotateRefusals: what cannot be rotated, and erase taking the pending
// key with it.
func TestRotateRefusals(t *testing.T) {
	e := startEnv(t, t.TempDir())
	v := openVM(t)
	vol := setup(t, e, v, "rr")
	e.admin(t, "POST", "/v1/admin/volumes/nope/rotate", nil, http.StatusNotFound)
	e.admin(t, "POST", "/v1/admin/volumes/"+vol+"/rotate", nil, http.StatusAccepted)
	during := e.unlockBoth(t, v, "rr", vol)
	e.admin(t, "POST", "/v1/admin/volumes/"+vol+"/erase", nil, http.StatusOK)
	if vi := e.volumeInfo(t, vol); !vi.Erased || vi.Rotation != "" {
		t.Fatalf("after erase: %+v, want erased with no rotation", vi)
	}
	e.admin(t, "POST", "/v1/admin/volumes/"+vol+"/rotate", nil, http.StatusConflict)
	code, body := e.confirm(t, during.session, during.next)
	wantRefusal(t, code, body, api.ReasonRevoked)
	code, body = e.vm(t, "POST", "/v1/challenge", api.ChallengeRequest{VM: "rr", Volume: vol, EKPub: v.ekPEM, AKPub: v.akPEM})
	wantRefusal(t, code, body, api.ReasonErased)
}

// TestRotateServiceCrash: a crash of the key service at each step of a
// rotation (an injected fault, then a restart on the same data directory)
// leaves a state from which the rotation completes: the old key is never
// destroyed before the proof, and the proven key always survives.
func TestRotateServiceCrash(t *testing.T) {
	var failAt atomic.Value
	failAt.Store("")
	faults := keysvc.WithFaults(func(step string) error {
		if failAt.Load() == step {
			return errors.New("crash")
		}
		return nil
	})
	for _, tc := range []struct {
		step string
		// want after the restart: is the rotation still pending, and is
		// the current key the new one?
		pending, newCurrent bool
	}{
		{keysvc.FaultRotateStart, false, false},
		{keysvc.FaultReleasePending, true, false},
		{keysvc.FaultConfirmProven, true, false},
		{keysvc.FaultConfirmDone, false, true},
	} {
		t.Run(tc.step, func(t *testing.T) {
			dir := t.TempDir()
			e := startEnv(t, dir, faults)
			v := openVM(t)
			vol := setup(t, e, v, "crash")
			failAt.Store(tc.step)
			defer failAt.Store("")

			var during released
			crashed := false
			if code, _ := e.do(t, "POST", "https://"+e.svc.AdminAddr()+"/v1/admin/volumes/"+vol+"/rotate", e.token, nil); code == http.StatusInternalServerError {
				crashed = true
			}
			if !crashed {
				code, body := e.unlock(t, v, "crash", vol)
				if code == http.StatusInternalServerError {
					crashed = true
				} else {
					var ur api.UnlockResponse
					json.Unmarshal(body, &ur)
					during = released{session: ur.Session, uk: importRaw(t, v, ur.ImportBlob), next: importRaw(t, v, ur.NextImportBlob)}
				}
			}
			if !crashed {
				if code, body := e.confirm(t, during.session, during.next); code != http.StatusInternalServerError {
					t.Fatalf("confirm with a fault at %s: %d %s", tc.step, code, body)
				}
			}
			failAt.Store("")
			e.stop(t)
			e = startEnv(t, dir, faults)

			vi := e.volumeInfo(t, vol)
			if (vi.Rotation == api.RotationPending) != tc.pending {
				t.Fatalf("after the crash the rotation is %q, want pending %v", vi.Rotation, tc.pending)
			}
			r := e.unlockBoth(t, v, "crash", vol)
			switch {
			case tc.newCurrent && (during.next == nil || !bytes.Equal(r.uk, during.next)):
				t.Fatal("the proven key is not the volume's after the crash")
			case !tc.newCurrent && !bytes.Equal(r.uk, ukBytes):
				t.Fatal("the old key was destroyed before the rotation completed")
			case tc.pending && during.next != nil && !bytes.Equal(r.next, during.next):
				t.Fatal("the pending key changed across the crash")
			}
			// From there the rotation completes.
			if !tc.pending && !tc.newCurrent {
				e.admin(t, "POST", "/v1/admin/volumes/"+vol+"/rotate", nil, http.StatusAccepted)
				r = e.unlockBoth(t, v, "crash", vol)
			}
			key := r.next
			if tc.newCurrent {
				key = r.uk
			}
			if code, body := e.confirm(t, r.session, key); code != http.StatusOK {
				t.Fatalf("confirm after the crash: %d %s", code, body)
			}
			final := e.unlockBoth(t, v, "crash", vol)
			if final.nextBlob || !bytes.Equal(final.uk, key) {
				t.Fatal("after completing, the volume's key is not the proven one")
			}
			e.stop(t)
		})
	}
}

// TestRotateAcrossMasterKeyRotation: a master-key rotation re-seals a
// volume's pending unwrap key with its current one, so that once the old
// master key is wiped both still open, and the UK rotation completes.
func TestRotateAcrossMasterKeyRotation(t *testing.T) {
	e := startEnv(t, t.TempDir())
	v := openVM(t)
	vol := setup(t, e, v, "mk")
	e.admin(t, "POST", "/v1/admin/volumes/"+vol+"/rotate", nil, http.StatusAccepted)
	before := e.unlockBoth(t, v, "mk", vol)
	e.admin(t, "POST", "/v1/admin/master-key/rotate", nil, http.StatusAccepted)
	if msg := e.waitRotation(t); msg != "" {
		t.Fatalf("master-key rotation stopped: %s", msg)
	}
	after := e.unlockBoth(t, v, "mk", vol)
	if !after.nextBlob || !bytes.Equal(after.uk, ukBytes) || !bytes.Equal(after.next, before.next) {
		t.Fatalf("after the master-key rotation: pending key released %v, current unchanged %v, pending unchanged %v",
			after.nextBlob, bytes.Equal(after.uk, ukBytes), bytes.Equal(after.next, before.next))
	}
	if code, body := e.confirm(t, after.session, after.next); code != http.StatusOK {
		t.Fatalf("confirm: %d %s", code, body)
	}
	if final := e.unlockBoth(t, v, "mk", vol); final.nextBlob || !bytes.Equal(final.uk, before.next) {
		t.Fatal("after the UK rotation the volume's key is not the proven one")
	}
	if rep := e.admin(t, "GET", "/v1/admin/audit/verify", nil, http.StatusOK); !bytes.Contains(rep, []byte(`"ok":true`)) {
		t.Fatalf("audit verify: %s", rep)
	}
}
