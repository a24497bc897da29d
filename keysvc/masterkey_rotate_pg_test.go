package keysvc_test

import (
	"context"
	"errors"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/keygate/keygate/internal/pgtest"
	"github.com/keygate/keygate/keysvc"
)

// TestMasterKeyRotationPostgres: a master-key rotation on a PostgreSQL
// store. Mid-rotation, a replica started from a copy of the data directory
// (the old key and master.key.next) is accepted by the database's master
// key check and unlocks, and so is one holding only the new key; after the rotation the database records the new
// key: a replica with the new key serves, one given the old key back is
// refused, and the audit chain verifies.
func TestMasterKeyRotationPostgres(t *testing.T) {
	url := pgtest.Shared(t).NewDB(t)
	dir := t.TempDir()
	paused, release := make(chan struct{}), make(chan struct{})
	var once sync.Once
	hook := func(batch int) error {
		if batch == 2 {
			once.Do(func() { close(paused) })
			<-release
		}
		return nil
	}
	a := startEnvWith(t, keysvc.Config{DataDir: dir, DB: url}, keysvc.WithRotateBatch(2), keysvc.WithRotateHook(hook))
	v := openVM(t)
	vols := fleet(t, a, v, 5)
	oldBytes, err := os.ReadFile(filepath.Join(dir, keysvc.MasterKeyFile))
	if err != nil {
		t.Fatal(err)
	}
	var unpause sync.Once
	t.Cleanup(func() { unpause.Do(func() { close(release) }) })
	a.admin(t, "POST", "/v1/admin/master-key/rotate", nil, http.StatusAccepted)
	<-paused

	// A replica made mid-rotation holds both keys; its own rotator is held
	// at its first batch so that only a's re-keys here.
	mid := replicaDir(t, dir)
	next, err := os.ReadFile(filepath.Join(dir, keysvc.MasterKeyFile+keysvc.NextKeySuffix))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(mid, keysvc.MasterKeyFile+keysvc.NextKeySuffix), next, 0o600); err != nil {
		t.Fatal(err)
	}
	// Released before the replicas' shutdown in cleanup, should the test
	// stop early, so that their held rotators let them stop.
	hold := make(chan struct{})
	var unhold sync.Once
	letGo := func() { unhold.Do(func() { close(hold) }) }
	b := startEnvWith(t, keysvc.Config{DataDir: mid, DB: url}, keysvc.WithRotateHook(func(int) error { <-hold; return errors.New("held") }))
	t.Cleanup(letGo)
	if body0(t, b, v, "rot-0", vols["rot-0"]) == nil {
		t.Fatal("no unlock at the replica started mid-rotation")
	}
	// One whose master.key is already the new key (as after a crash
	// between installing it and finishing) is accepted too, though the
	// database still records the old one.
	installed := replicaDir(t, dir)
	if err := os.WriteFile(filepath.Join(installed, keysvc.MasterKeyFile), next, 0o600); err != nil {
		t.Fatal(err)
	}
	b2 := startEnvWith(t, keysvc.Config{DataDir: installed, DB: url}, keysvc.WithRotateHook(func(int) error { <-hold; return errors.New("held") }))
	t.Cleanup(letGo)
	if got := b2.masterKey(t); got.Rotation == nil {
		t.Fatalf("replica with the new key mid-rotation: %+v, want the rotation under way", got)
	}
	letGo()
	b.stop(t)
	b2.stop(t)

	unpause.Do(func() { close(release) })
	if msg := a.waitRotation(t); msg != "" {
		t.Fatalf("rotation stopped: %s", msg)
	}
	after := a.masterKey(t)
	a.stop(t)

	old := t.TempDir()
	for _, f := range []string{keysvc.CAFile, "ca.key", keysvc.AdminTokenFile, "server.pem", "server.key"} {
		b, err := os.ReadFile(filepath.Join(dir, f))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(old, f), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(old, keysvc.MasterKeyFile), oldBytes, 0o600); err != nil {
		t.Fatal(err)
	}
	_, err = keysvc.Start(context.Background(), keysvc.Config{DataDir: old, DB: url, Listen: "127.0.0.1:0", AdminListen: "127.0.0.1:0", Logger: discardLogger()})
	if !errors.Is(err, keysvc.ErrMasterKeyMismatch) {
		t.Fatalf("replica with the old key after the rotation: %v, want ErrMasterKeyMismatch", err)
	}
	c := startEnvWith(t, keysvc.Config{DataDir: replicaDir(t, dir), DB: url})
	if got := c.masterKey(t); got.Fingerprint != after.Fingerprint || got.Rotation != nil {
		t.Fatalf("replica with the new key: %+v, want fingerprint %s and no rotation", got, after.Fingerprint)
	}
	if body0(t, c, v, "rot-0", vols["rot-0"]) == nil {
		t.Fatal("no unlock after the rotation")
	}
	c.verifyAudit(t)
}
