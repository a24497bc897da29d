package keysvc_test

import (
	"bytes"
	"context"
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

	"github.com/keygate/keygate/internal/pgtest"
	"github.com/keygate/keygate/keysvc"
	"github.com/keygate/keygate/keysvc/api"
)

// unlockStatus is one challenge and unlock at e: the status of the first
// answer that is not 200 (or 200), for goroutines.
func (e *env) unlockStatus(v *vmTPM, name, volume string) (int, error) {
	code, b, err := e.post("/v1/challenge", api.ChallengeRequest{VM: name, Volume: volume, EKPub: v.ekPEM, AKPub: v.akPEM})
	if err != nil || code != http.StatusOK {
		return code, fmt.Errorf("challenge: %d %s %v", code, b, err)
	}
	var ch api.ChallengeResponse
	if err := json.Unmarshal(b, &ch); err != nil {
		return 0, err
	}
	att, err := v.tpm.Attest(api.QuoteData(ch.Nonce, e.ca), v.alg)
	if err != nil {
		return 0, err
	}
	q, _ := proto.Marshal(att)
	code, b, err = e.post("/v1/unlock", api.UnlockRequest{Challenge: ch.Challenge, Attestation: q})
	if err != nil || code != http.StatusOK {
		return code, fmt.Errorf("unlock: %d %s %v", code, b, err)
	}
	return code, nil
}

// TestReplicasThroughMasterKeyRotation: two serving replicas on one
// PostgreSQL database while a master-key rotation begun at one of them runs
// batch by batch, with unlocks through both all along, as keygate boot
// makes them (a 503 sends it to the other replica; docs/protocol.md).
//
// follows: the new key is copied into the second replica's data directory
// (docs/operator.md); it switches online, serves throughout, and installs
// the new key itself when the rotation finishes. refuses: it never gets
// the key; it answers 503 naming what to copy, /readyz says not ready, and
// it raises no false tamper alarm, while the first replica serves. In both,
// no unlock fails outright, every row ends under the new key (a replica
// holding only the new key verifies every row and unlocks), and one
// holding only the old key is refused.
func TestReplicasThroughMasterKeyRotation(t *testing.T) {
	for _, follows := range []bool{true, false} {
		name := "refuses"
		if follows {
			name = "follows"
		}
		t.Run(name, func(t *testing.T) {
			url := pgtest.Shared(t).NewDB(t)
			dirA := t.TempDir()
			// Each batch waits for unlocks through both replicas that began
			// after the previous batch.
			var atA, atB atomic.Int64
			hook := func(int) error {
				a0, b0 := atA.Load(), atB.Load()
				for deadline := time.Now().Add(30 * time.Second); atA.Load() < a0+1 || atB.Load() < b0+1; {
					if time.Now().After(deadline) {
						return errors.New("no unlocks through both replicas")
					}
					time.Sleep(time.Millisecond)
				}
				return nil
			}
			// Two VMs' worth of unlocks from one test VM: above one VM's rate.
			rates := keysvc.WithRateLimits(1000, 1000)
			a := startEnvWith(t, keysvc.Config{DataDir: dirA, DB: url}, keysvc.WithRotateBatch(2), keysvc.WithRotateHook(hook), rates)
			v := openVM(t)
			vols := fleet(t, a, v, 6)
			oldKey, err := os.ReadFile(filepath.Join(dirA, keysvc.MasterKeyFile))
			if err != nil {
				t.Fatal(err)
			}
			dirB := replicaDir(t, dirA)
			b := startEnvWith(t, keysvc.Config{DataDir: dirB, DB: url}, rates)

			stop := make(chan struct{})
			var (
				wg       sync.WaitGroup
				mu       sync.Mutex
				failures []error
				retried  atomic.Int64
			)
			loop := func(first, other *env, count *atomic.Int64) {
				defer wg.Done()
				for {
					select {
					case <-stop:
						return
					default:
					}
					code, err := first.unlockStatus(v, "rot-0", vols["rot-0"])
					if code == http.StatusServiceUnavailable {
						// Until the second replica has followed (at most a
						// probe after the key is copied), or throughout
						// when it cannot.
						// As keygate boot does: the next replica.
						retried.Add(1)
						_, err = other.unlockStatus(v, "rot-0", vols["rot-0"])
					}
					if err != nil {
						mu.Lock()
						failures = append(failures, err)
						mu.Unlock()
					}
					count.Add(1)
				}
			}
			wg.Add(2)
			go loop(a, b, &atA)
			go loop(b, a, &atB)

			a.admin(t, "POST", "/v1/admin/master-key/rotate", nil, http.StatusAccepted)
			next, err := os.ReadFile(filepath.Join(dirA, keysvc.MasterKeyFile+keysvc.NextKeySuffix))
			if err != nil {
				t.Fatal(err)
			}
			if follows {
				// The operator's step: the new key into the other replica's
				// data directory, while both serve.
				if err := os.WriteFile(filepath.Join(dirB, keysvc.MasterKeyFile+keysvc.NextKeySuffix), next, 0o600); err != nil {
					t.Fatal(err)
				}
			}
			if msg := a.waitRotation(t); msg != "" {
				t.Fatalf("rotation stopped: %s", msg)
			}
			after := a.masterKey(t)
			if follows {
				// b installs the new key itself within a probe or two.
				for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(50 * time.Millisecond) {
					got, _ := os.ReadFile(filepath.Join(dirB, keysvc.MasterKeyFile))
					_, nerr := os.Stat(filepath.Join(dirB, keysvc.MasterKeyFile+keysvc.NextKeySuffix))
					if bytes.Equal(got, next) && errors.Is(nerr, os.ErrNotExist) {
						break
					}
					if time.Now().After(deadline) {
						t.Fatal("the second replica did not install the new key")
					}
				}
			}
			// More unlocks through both after the finish.
			for n, a0, b0 := 0, atA.Load(), atB.Load(); atA.Load() < a0+3 || atB.Load() < b0+3; n++ {
				time.Sleep(10 * time.Millisecond)
			}
			close(stop)
			wg.Wait()
			t.Logf("unlocks: %d through a, %d through b, %d sent on to the other replica after a 503", atA.Load(), atB.Load(), retried.Load())
			if len(failures) > 0 {
				t.Fatalf("%d unlocks failed at both replicas, first: %v", len(failures), failures[0])
			}

			if follows {
				if got := b.masterKey(t); got.Fingerprint != after.Fingerprint || got.Rotation != nil {
					t.Fatalf("the second replica: %+v, want key %s and no rotation", got, after.Fingerprint)
				}
				body0(t, b, v, "rot-0", vols["rot-0"])
			} else {
				// Within a probe or two it says the rotation is over.
				for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(100 * time.Millisecond) {
					code, body := b.vm(t, "POST", "/v1/challenge", api.ChallengeRequest{VM: "rot-0", Volume: vols["rot-0"], EKPub: v.ekPEM, AKPub: v.akPEM})
					if code == http.StatusServiceUnavailable && strings.Contains(string(body), "rotated at another replica") {
						break
					}
					if time.Now().After(deadline) {
						t.Fatalf("the replica without the new key after the rotation: %d %s, want 503 saying it was rotated", code, body)
					}
				}
				resp, err := b.client.Get("https://" + b.svc.VMAddr() + "/readyz")
				if err != nil {
					t.Fatal(err)
				}
				resp.Body.Close()
				if resp.StatusCode != http.StatusServiceUnavailable {
					t.Fatalf("/readyz of the replica without the new key: %d, want 503", resp.StatusCode)
				}
				if retried.Load() == 0 {
					t.Error("no unlock was sent on from the replica without the new key")
				}
				for _, ev := range a.listEvents(t, "severity=critical") {
					if ev.Kind == "store-tampered" {
						t.Fatalf("a false tamper alarm: %+v", ev)
					}
				}
			}
			// Every row is under the new key: a replica holding it alone
			// verifies every row and the chain, and unlocks.
			c := startEnvWith(t, keysvc.Config{DataDir: replicaDir(t, dirA), DB: url})
			if rep := c.verifyAudit(t); !rep.OK {
				t.Fatalf("audit verify under the new key alone: %+v", rep)
			}
			body0(t, c, v, "rot-0", vols["rot-0"])
			old := replicaDir(t, dirA)
			if err := os.WriteFile(filepath.Join(old, keysvc.MasterKeyFile), oldKey, 0o600); err != nil {
				t.Fatal(err)
			}
			_, err = keysvc.Start(context.Background(), keysvc.Config{DataDir: old, DB: url, Listen: "127.0.0.1:0", AdminListen: "127.0.0.1:0", Logger: discardLogger()})
			if !errors.Is(err, keysvc.ErrMasterKeyMismatch) {
				t.Fatalf("a replica with the old key after the rotation: %v, want ErrMasterKeyMismatch", err)
			}
		})
	}
}
