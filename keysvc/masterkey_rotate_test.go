package keysvc_test

import (
	"bytes"
	"context"
	"database/sql"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/keygate/keygate/attest"
	"github.com/keygate/keygate/keysvc"
	"github.com/keygate/keygate/keysvc/api"
	"github.com/keygate/keygate/keysvc/masterkey"
	"github.com/keygate/keygate/keysvc/store"
	"github.com/keygate/keygate/tpm"
)

// tryUnlock is unlock without failing the test, for other goroutines.
func (e *env) tryUnlock(v *vmTPM, name, volume string) error {
	code, b, err := e.post("/v1/challenge", api.ChallengeRequest{VM: name, Volume: volume, EKPub: v.ekPEM, AKPub: v.akPEM})
	if err != nil || code != http.StatusOK {
		return fmt.Errorf("challenge: %d %s %v", code, b, err)
	}
	var ch api.ChallengeResponse
	if err := json.Unmarshal(b, &ch); err != nil {
		return err
	}
	att, err := v.tpm.Attest(api.QuoteData(ch.Nonce, e.ca), v.alg)
	if err != nil {
		return err
	}
	q, _ := proto.Marshal(att)
	code, b, err = e.post("/v1/unlock", api.UnlockRequest{Challenge: ch.Challenge, Attestation: q})
	if err != nil || code != http.StatusOK {
		return fmt.Errorf("unlock: %d %s %v", code, b, err)
	}
	return nil
}

func (e *env) masterKey(t testing.TB) api.MasterKeyInfo {
	t.Helper()
	var info api.MasterKeyInfo
	if err := json.Unmarshal(e.admin(t, "GET", "/v1/admin/master-key", nil, http.StatusOK), &info); err != nil {
		t.Fatal(err)
	}
	return info
}

// waitRotation polls until no rotation is under way, or one stopped on an
// error (returned).
func (e *env) waitRotation(t testing.TB) string {
	t.Helper()
	for range 2400 {
		info := e.masterKey(t)
		if info.Rotation == nil {
			return ""
		}
		if !info.Rotation.Running && info.Rotation.Error != "" {
			return info.Rotation.Error
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatal("the rotation neither finished nor stopped")
	return ""
}

func (e *env) verifyAudit(t testing.TB) api.AuditVerifyResponse {
	t.Helper()
	var rep api.AuditVerifyResponse
	json.Unmarshal(e.admin(t, "GET", "/v1/admin/audit/verify", nil, http.StatusOK), &rep)
	if !rep.OK {
		t.Fatalf("audit verify: %+v", rep)
	}
	return rep
}

// fleet enrolls n VMs (the first played by v, the rest by keys of no TPM)
// with a volume each, and returns the volume IDs by VM name.
func fleet(t *testing.T, e *env, v *vmTPM, n int) map[string]string {
	t.Helper()
	vols := map[string]string{"rot-0": setup(t, e, v, "rot-0")}
	for i := 1; i < n; i++ {
		name := fmt.Sprintf("rot-%d", i)
		e.admin(t, "POST", "/v1/admin/vms", api.EnrollRequest{Name: name, EKPub: randomPEM(t), AKPub: randomPEM(t)}, http.StatusCreated)
		e.admin(t, "POST", "/v1/admin/volumes", api.VolumeRequest{ID: name + "-vol", VM: name, Key: ukBytes}, http.StatusCreated)
		vols[name] = name + "-vol"
	}
	// An erased volume is re-MAC'd but has no key to re-seal.
	e.admin(t, "POST", "/v1/admin/volumes", api.VolumeRequest{ID: "gone-vol", VM: "rot-1", Key: ukBytes}, http.StatusCreated)
	e.admin(t, "POST", "/v1/admin/volumes/gone-vol/erase", nil, http.StatusOK)
	return vols
}

// checkSealedUnder opens the store of a stopped service and checks that
// every volume's UK opens under want and under none of notUnder.
func checkSealedUnder(t *testing.T, dir string, want masterkey.Master, notUnder ...masterkey.Master) {
	t.Helper()
	st, err := store.OpenSQLite(context.Background(), dir)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	vols, err := st.ListVolumes(context.Background(), "")
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, vol := range vols {
		if vol.Erased() {
			continue
		}
		vm, err := st.GetVM(context.Background(), vol.VM)
		if err != nil {
			t.Fatal(err)
		}
		ek, err := tpm.ParsePublicKeyPEM([]byte(vm.EKPubPEM))
		if err != nil {
			t.Fatal(err)
		}
		fp, _ := attest.KeyFingerprint(ek)
		id := "uk v2\x00" + vol.ID + "\x00" + vol.VM + "\x00" + hex.EncodeToString(fp[:])
		uk, err := want.Open(id, vol.SealedUK)
		if err != nil || !bytes.Equal(uk.Bytes(), ukBytes) {
			t.Fatalf("volume %s does not open under the new key: %v", vol.ID, err)
		}
		uk.Destroy()
		for _, old := range notUnder {
			if _, err := old.Open(id, vol.SealedUK); !errors.Is(err, masterkey.ErrOpen) {
				t.Fatalf("volume %s: old key: %v, want ErrOpen", vol.ID, err)
			}
		}
		n++
	}
	if n == 0 {
		t.Fatal("no volume checked")
	}
}

// TestMasterKeyRotation rotates the master key of a file-keyed service
// while a VM unlocks over and over, one unlock between every two batches:
// no unlock fails, every row ends under the new key, the old key opens
// nothing, the audit chain verifies, and a service given the old key
// refuses to start.
func TestMasterKeyRotation(t *testing.T) {
	dir := t.TempDir()
	// Each batch waits for an unlock that began after the previous batch.
	var unlocked atomic.Int64
	hook := func(int) error {
		start := unlocked.Load()
		for unlocked.Load() < start+1 {
			time.Sleep(time.Millisecond)
		}
		return nil
	}
	e := startEnv(t, dir, keysvc.WithRotateBatch(3), keysvc.WithRotateHook(hook))
	v := openVM(t)
	vols := fleet(t, e, v, 6)
	oldBytes, err := os.ReadFile(filepath.Join(dir, keysvc.MasterKeyFile))
	if err != nil {
		t.Fatal(err)
	}
	before := e.masterKey(t)

	stop := make(chan struct{})
	var (
		wg       sync.WaitGroup
		failures []error
	)
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			select {
			case <-stop:
				return
			default:
			}
			if err := e.tryUnlock(v, "rot-0", vols["rot-0"]); err != nil {
				failures = append(failures, err)
			}
			unlocked.Add(1)
		}
	}()
	b := e.admin(t, "POST", "/v1/admin/master-key/rotate", nil, http.StatusAccepted)
	var started api.MasterKeyInfo
	json.Unmarshal(b, &started)
	if msg := e.waitRotation(t); msg != "" {
		t.Fatalf("rotation stopped: %s", msg)
	}
	close(stop)
	wg.Wait()
	if len(failures) > 0 {
		t.Fatalf("%d unlocks failed during the rotation, first: %v", len(failures), failures[0])
	}
	if unlocked.Load() < 4 {
		t.Fatalf("only %d unlocks ran during the rotation", unlocked.Load())
	}
	after := e.masterKey(t)
	if after.Fingerprint == before.Fingerprint || started.Rotation == nil || started.Rotation.NewKey != after.Fingerprint {
		t.Fatalf("fingerprint %s -> %s (rotation %+v)", before.Fingerprint, after.Fingerprint, started.Rotation)
	}
	if _, err := os.Stat(filepath.Join(dir, keysvc.MasterKeyFile+keysvc.NextKeySuffix)); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("master.key.next left behind: %v", err)
	}
	if body0(t, e, v, "rot-0", vols["rot-0"]) == nil {
		t.Fatal("no unlock after the rotation")
	}
	rep := e.verifyAudit(t)
	if rep.Retired == 0 {
		t.Fatalf("no record counted as retired: %+v", rep)
	}
	recs := auditActions(t, e)
	if !strings.Contains(recs, "master-key-rotate:begin") || !strings.Contains(recs, "master-key-rotate:finish") {
		t.Fatalf("audit records: %s", recs)
	}
	e.stop(t)

	// The old key opens nothing; the new one opens everything.
	oldDir := t.TempDir()
	if err := os.WriteFile(filepath.Join(oldDir, "old.key"), oldBytes, 0o600); err != nil {
		t.Fatal(err)
	}
	old, _, err := masterkey.LoadOrCreate(filepath.Join(oldDir, "old.key"))
	if err != nil {
		t.Fatal(err)
	}
	defer old.Destroy()
	cur, _, err := masterkey.LoadOrCreate(filepath.Join(dir, keysvc.MasterKeyFile))
	if err != nil {
		t.Fatal(err)
	}
	defer cur.Destroy()
	checkSealedUnder(t, dir, cur, old)

	// The offline commands append to the chain under the new key.
	if _, err := keysvc.RotateAdminToken(context.Background(), dir, ""); err != nil {
		t.Fatalf("admin-token rotate after a master-key rotation: %v", err)
	}
	// Restarted on the new key: serves. Given the old key back: refuses.
	e2 := startEnv(t, dir)
	if body0(t, e2, v, "rot-0", vols["rot-0"]) == nil {
		t.Fatal("no unlock after a restart")
	}
	e2.verifyAudit(t)
	e2.stop(t)
	if err := os.WriteFile(filepath.Join(dir, keysvc.MasterKeyFile), oldBytes, 0o600); err != nil {
		t.Fatal(err)
	}
	_, err = keysvc.Start(context.Background(), keysvc.Config{DataDir: dir, Listen: "127.0.0.1:0", AdminListen: "127.0.0.1:0", Logger: discardLogger()})
	// The finished rotation recorded the new key as the database's: the
	// master key check refuses the old one before its anchor is read.
	if !errors.Is(err, keysvc.ErrMasterKeyMismatch) {
		t.Fatalf("start with the old key: %v, want ErrMasterKeyMismatch", err)
	}
}

// auditActions lists the audit chain as "action[:phase]" words.
func auditActions(t *testing.T, e *env) string {
	t.Helper()
	var recs []struct {
		Action  string          `json:"action"`
		Details json.RawMessage `json:"details"`
	}
	json.Unmarshal(e.admin(t, "GET", "/v1/admin/audit", nil, http.StatusOK), &recs)
	var out []string
	for _, r := range recs {
		var d struct {
			Phase string `json:"phase"`
		}
		json.Unmarshal(r.Details, &d)
		if d.Phase != "" {
			out = append(out, r.Action+":"+d.Phase)
		} else {
			out = append(out, r.Action)
		}
	}
	return strings.Join(out, " ")
}

var errCrash = errors.New("injected crash")

// TestMasterKeyRotationResumes stops a rotation between batches, as a
// crash would: rows under both keys stay readable, the service restarted
// takes the rotation up where it stopped and finishes it, and the chain
// verifies.
func TestMasterKeyRotationResumes(t *testing.T) {
	for _, crashAt := range []int{1, 3, keysvc.HookInstalled} {
		name := fmt.Sprintf("before batch %d", crashAt)
		if crashAt == keysvc.HookInstalled {
			name = "after the new key is installed"
		}
		t.Run(name, func(t *testing.T) {
			dir := t.TempDir()
			e := startEnv(t, dir, keysvc.WithRotateBatch(2), keysvc.WithRotateHook(func(b int) error {
				if b == crashAt {
					return errCrash
				}
				return nil
			}))
			v := openVM(t)
			vols := fleet(t, e, v, 5)
			before := e.masterKey(t)
			e.admin(t, "POST", "/v1/admin/master-key/rotate", nil, http.StatusAccepted)
			if msg := e.waitRotation(t); !strings.Contains(msg, errCrash.Error()) {
				t.Fatalf("rotation: %q, want the injected crash", msg)
			}
			mid := e.masterKey(t)
			done := 2 * (crashAt - 1)
			if crashAt == keysvc.HookInstalled {
				done = 5 + 6 // every VM and volume, the erased one too
			}
			if mid.Rotation == nil || mid.Rotation.VMs+mid.Rotation.Volumes != done {
				t.Fatalf("stopped rotation: %+v, want %d rows done", mid.Rotation, done)
			}
			// Rows under the old key and under the new one both serve.
			for _, name := range []string{"rot-0"} {
				if body0(t, e, v, name, vols[name]) == nil {
					t.Fatal("no unlock mid-rotation")
				}
			}
			e.admin(t, "POST", "/v1/admin/vms", api.EnrollRequest{Name: "mid", EKPub: randomPEM(t), AKPub: randomPEM(t)}, http.StatusCreated)
			e.admin(t, "POST", "/v1/admin/volumes", api.VolumeRequest{ID: "mid-vol", VM: "mid", Key: ukBytes}, http.StatusCreated)
			e.verifyAudit(t)
			e.stop(t)
			_, err := os.Stat(filepath.Join(dir, keysvc.MasterKeyFile+keysvc.NextKeySuffix))
			if installed := crashAt == keysvc.HookInstalled; installed != errors.Is(err, os.ErrNotExist) {
				t.Fatalf("master.key.next: %v (installed: %v)", err, installed)
			}

			e2 := startEnv(t, dir)
			if msg := e2.waitRotation(t); msg != "" {
				t.Fatalf("resumed rotation stopped: %s", msg)
			}
			after := e2.masterKey(t)
			if after.Fingerprint != mid.Rotation.NewKey || after.Fingerprint == before.Fingerprint {
				t.Fatalf("fingerprint after resume %s, want %s", after.Fingerprint, mid.Rotation.NewKey)
			}
			if body0(t, e2, v, "rot-0", vols["rot-0"]) == nil {
				t.Fatal("no unlock after the resumed rotation")
			}
			e2.verifyAudit(t)
			if recs := auditActions(t, e2); !strings.Contains(recs, "master-key-rotate:resume") || !strings.Contains(recs, "master-key-rotate:finish") {
				t.Fatalf("audit records: %s", recs)
			}
			e2.stop(t)
			cur, _, err := masterkey.LoadOrCreate(filepath.Join(dir, keysvc.MasterKeyFile))
			if err != nil {
				t.Fatal(err)
			}
			defer cur.Destroy()
			checkSealedUnder(t, dir, cur)
		})
	}
}

// TestChallengeAcrossRotation: a challenge issued before the rotation
// redeems after it has finished.
func TestChallengeAcrossRotation(t *testing.T) {
	e := startEnv(t, t.TempDir())
	v := openVM(t)
	vol := setup(t, e, v, "inflight")
	ch := e.challenge(t, v, "inflight", vol)
	e.admin(t, "POST", "/v1/admin/master-key/rotate", nil, http.StatusAccepted)
	if msg := e.waitRotation(t); msg != "" {
		t.Fatal(msg)
	}
	code, body := e.vm(t, "POST", "/v1/unlock", api.UnlockRequest{Challenge: ch.Challenge, Attestation: v.quote(t, ch.Nonce)})
	if code != http.StatusOK {
		t.Fatalf("unlock with a challenge from before the rotation: %d %s", code, body)
	}
	if uk, err := v.importBlob(t, body, tpm.ECC); err != nil || !bytes.Equal(uk, ukBytes) {
		t.Fatalf("import: %v", err)
	}
	// A challenge past its TTL is refused, whichever key made it.
	ch = e.challenge(t, v, "inflight", vol)
	e.admin(t, "POST", "/v1/admin/master-key/rotate", nil, http.StatusAccepted)
	if msg := e.waitRotation(t); msg != "" {
		t.Fatal(msg)
	}
	e.clock.Add(2 * time.Minute)
	code, body = e.vm(t, "POST", "/v1/unlock", api.UnlockRequest{Challenge: ch.Challenge, Attestation: v.quote(t, ch.Nonce)})
	wantRefusal(t, code, body, api.ReasonChallenge)
}

// TestRotationRefusesTamperedRow: a row changed behind the service's back
// stops the rotation, naming it, instead of being re-MAC'd under the new
// key; the rows keep serving meanwhile, and the audit check still names
// the row.
func TestRotationRefusesTamperedRow(t *testing.T) {
	dir := t.TempDir()
	e := startEnv(t, dir, keysvc.WithRotateBatch(2))
	v := openVM(t)
	vols := fleet(t, e, v, 4)
	db, err := sql.Open("sqlite", filepath.Join(dir, store.DBFile)+"?_pragma=busy_timeout(5000)")
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	if _, err := db.Exec(`UPDATE vms SET provisioning_allowed = 1 WHERE name = 'rot-2'`); err != nil {
		t.Fatal(err)
	}
	e.admin(t, "POST", "/v1/admin/master-key/rotate", nil, http.StatusAccepted)
	msg := e.waitRotation(t)
	if !strings.Contains(msg, `vm "rot-2"`) || !strings.Contains(msg, "integrity") {
		t.Fatalf("rotation over a tampered row: %q, want it stopped naming vm rot-2", msg)
	}
	if body0(t, e, v, "rot-0", vols["rot-0"]) == nil {
		t.Fatal("no unlock while the rotation is stopped")
	}
	var rep api.AuditVerifyResponse
	json.Unmarshal(e.admin(t, "GET", "/v1/admin/audit/verify", nil, http.StatusOK), &rep)
	if rep.OK || !strings.Contains(strings.Join(rep.Problems, "\n"), `vm "rot-2"`) {
		t.Fatalf("audit verify: %+v, want the tampered row named", rep)
	}
}

// TestMasterKeyRotationSealed: a master key sealed to a TPM rotates to a
// new key sealed to the same TPM. master.key.tpm then holds the new blob,
// nothing else is left beside it (no plain key, no .next or .old blob),
// unlocks go on, and a restart unseals the new key; the old blob, which the
// TPM still opens, is refused by the database's record of the key.
func TestMasterKeyRotationSealed(t *testing.T) {
	tp := startSwtpm(t) // the VM plays the in-process simulator
	dir := t.TempDir()
	keyPath := filepath.Join(dir, keysvc.MasterKeyFile)
	t.Cleanup(masterkey.UseSealer(keyPath, tp))
	sealed := keyPath + masterkey.SealedSuffix

	e := startEnv(t, dir, keysvc.WithRotateBatch(2))
	v := openVM(t)
	vols := fleet(t, e, v, 4)
	oldBlob, err := os.ReadFile(sealed)
	if err != nil {
		t.Fatalf("no sealed master key: %v", err)
	}
	before := e.masterKey(t)
	e.admin(t, "POST", "/v1/admin/master-key/rotate", nil, http.StatusAccepted)
	if msg := e.waitRotation(t); msg != "" {
		t.Fatalf("rotation stopped: %s", msg)
	}
	if after := e.masterKey(t); after.Fingerprint == before.Fingerprint {
		t.Fatalf("fingerprint unchanged: %s", after.Fingerprint)
	}
	newBlob, err := os.ReadFile(sealed)
	if err != nil || bytes.Equal(newBlob, oldBlob) {
		t.Fatalf("master.key.tpm after the rotation: err %v, changed %v", err, !bytes.Equal(newBlob, oldBlob))
	}
	for _, left := range []string{keyPath, keyPath + keysvc.NextKeySuffix, keyPath + keysvc.NextKeySuffix + masterkey.SealedSuffix, keyPath + ".old" + masterkey.SealedSuffix} {
		if _, err := os.Stat(left); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s left behind: %v", filepath.Base(left), err)
		}
	}
	if body0(t, e, v, "rot-0", vols["rot-0"]) == nil {
		t.Fatal("no unlock after the rotation")
	}
	e.verifyAudit(t)
	e.stop(t)

	if err := os.WriteFile(sealed, oldBlob, 0o600); err != nil {
		t.Fatal(err)
	}
	_, err = keysvc.Start(context.Background(), keysvc.Config{DataDir: dir, Listen: "127.0.0.1:0", AdminListen: "127.0.0.1:0", Logger: discardLogger()})
	if !errors.Is(err, keysvc.ErrMasterKeyMismatch) {
		t.Fatalf("start with the old sealed key: %v, want ErrMasterKeyMismatch", err)
	}
	if err := os.WriteFile(sealed, newBlob, 0o600); err != nil {
		t.Fatal(err)
	}
	e2 := startEnv(t, dir)
	if body0(t, e2, v, "rot-0", vols["rot-0"]) == nil {
		t.Fatal("no unlock after a restart on the new sealed key")
	}
	e2.verifyAudit(t)
}
