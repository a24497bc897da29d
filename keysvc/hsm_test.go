package keysvc_test

import (
	"context"
	"errors"
	"net/http"
	"os"
	"slices"
	"strings"
	"testing"

	"github.com/keygate/keygate/internal/testutil"
	"github.com/keygate/keygate/keysvc"
	"github.com/keygate/keygate/keysvc/masterkey"
	"github.com/keygate/keygate/keysvc/masterkey/hsm"
	"github.com/keygate/keygate/tpm"
)

const hsmPIN = "4711"

// hsmConfig is a Config whose master key is the object "master" in a
// fresh SoftHSM2 token "keygate".
func hsmConfig(t *testing.T, dir, pin string) keysvc.Config {
	t.Helper()
	module := testutil.SoftHSM(t, "keygate", hsmPIN)
	return keysvc.Config{DataDir: dir, PKCS11: hsmCfg(t, module, pin)}
}

// benchHSM is a fresh SoftHSM2 token's Config for a benchmark.
func benchHSM(b *testing.B) *hsm.Config {
	b.Helper()
	return hsmCfg(b, testutil.SoftHSM(b, "keygate", hsmPIN), hsmPIN)
}

func hsmCfg(t testing.TB, module, pin string) *hsm.Config {
	t.Helper()
	u, err := hsm.ParseURI("pkcs11:token=keygate;object=master")
	if err != nil {
		t.Fatal(err)
	}
	return &hsm.Config{Module: module, URI: u, PIN: []byte(pin)}
}

// noKeyFiles fails if any master key file is in dir.
func noKeyFiles(t *testing.T, dir string) {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), keysvc.MasterKeyFile) {
			t.Fatalf("%s written in the data directory of an HSM-backed service", e.Name())
		}
	}
}

// TestHSMMasterKey runs the service with its master key in SoftHSM2: the
// missing key object is created, a VM enrolls and unlocks, again after a
// restart, and no master key file is ever written.
func TestHSMMasterKey(t *testing.T) {
	dir := t.TempDir()
	cfg := hsmConfig(t, dir, hsmPIN)
	e := startEnvConfig(t, cfg)
	if !slices.Contains(e.svc.Data.Created, "pkcs11:master") {
		t.Fatalf("created %v, want the key object", e.svc.Data.Created)
	}
	v := openVM(t)
	vol := setup(t, e, v, "hsm-vm")
	uk, err := v.importBlob(t, body0(t, e, v, "hsm-vm", vol), tpm.ECC)
	if err != nil || string(uk) != string(ukBytes) {
		t.Fatalf("import: %v", err)
	}
	if info := e.masterKey(t); info.Kind != "pkcs11" || len(info.Fingerprint) != 32 {
		t.Fatalf("master key info %+v", info)
	}
	e.stop(t)
	noKeyFiles(t, dir)

	e = startEnvConfig(t, cfg)
	if len(e.svc.Data.Created) != 0 {
		t.Fatalf("restart created %v", e.svc.Data.Created)
	}
	if _, err := v.importBlob(t, body0(t, e, v, "hsm-vm", vol), tpm.ECC); err != nil {
		t.Fatalf("import after restart: %v", err)
	}
	e.verifyAudit(t)
	e.stop(t)
	noKeyFiles(t, dir)
}

// TestHSMRefusals: a wrong PIN, a token that is not there, and a data
// directory keyed by a file are each refused, by name.
func TestHSMRefusals(t *testing.T) {
	dir := t.TempDir()
	cfg := hsmConfig(t, dir, hsmPIN)
	start := func(cfg keysvc.Config) error {
		cfg.Listen, cfg.AdminListen, cfg.Logger = "127.0.0.1:0", "127.0.0.1:0", discardLogger()
		svc, err := keysvc.Start(context.Background(), cfg)
		if err == nil {
			svc.Shutdown(context.Background())
		}
		return err
	}
	wrong := cfg
	wrong.PKCS11 = hsmCfg(t, cfg.PKCS11.Module, "0000")
	if err := start(wrong); !errors.Is(err, hsm.ErrPIN) || !strings.Contains(err.Error(), "--pkcs11-pin-file") {
		t.Fatalf("wrong PIN: %v, want ErrPIN naming --pkcs11-pin-file", err)
	}
	other := cfg
	other.PKCS11 = hsmCfg(t, cfg.PKCS11.Module, hsmPIN)
	other.PKCS11.URI.Token = "nope"
	if err := start(other); !errors.Is(err, hsm.ErrToken) {
		t.Fatalf("missing token: %v, want ErrToken", err)
	}
	fileDir := t.TempDir()
	e := startEnv(t, fileDir)
	e.stop(t)
	cfg.DataDir = fileDir
	if err := start(cfg); err == nil || !strings.Contains(err.Error(), "master.key exists") {
		t.Fatalf("file-keyed data directory: %v, want a refusal", err)
	}
	noKeyFiles(t, dir)
}

// TestHSMRotation rotates a master key held in SoftHSM2: the new key is a
// new token object, the old object is destroyed at the end, the rows open
// under the new key only, and no key file is written.
func TestHSMRotation(t *testing.T) {
	dir := t.TempDir()
	cfg := hsmConfig(t, dir, hsmPIN)
	e := startEnvConfig(t, cfg, keysvc.WithRotateBatch(2))
	v := openVM(t)
	vols := fleet(t, e, v, 4)
	before := e.masterKey(t)
	e.admin(t, "POST", "/v1/admin/master-key/rotate", nil, http.StatusAccepted)
	if msg := e.waitRotation(t); msg != "" {
		t.Fatalf("rotation stopped: %s", msg)
	}
	after := e.masterKey(t)
	if after.Fingerprint == before.Fingerprint {
		t.Fatal("fingerprint unchanged")
	}
	if body0(t, e, v, "rot-0", vols["rot-0"]) == nil {
		t.Fatal("no unlock after the rotation")
	}
	e.verifyAudit(t)
	e.stop(t)
	noKeyFiles(t, dir)

	tok, err := hsm.Open(*cfg.PKCS11)
	if err != nil {
		t.Fatal(err)
	}
	cur, err := tok.Find("master")
	if err != nil {
		t.Fatal(err)
	}
	if fp, _ := masterkey.Fingerprint(cur); fp != after.Fingerprint {
		t.Fatalf("token object \"master\" is %s, want the new key %s", fp, after.Fingerprint)
	}
	if _, err := tok.FindNext(); !errors.Is(err, hsm.ErrNotFound) {
		t.Fatalf("next object left: %v", err)
	}
	checkSealedUnder(t, dir, cur)
	tok.Close()

	e = startEnvConfig(t, cfg)
	if body0(t, e, v, "rot-0", vols["rot-0"]) == nil {
		t.Fatal("no unlock after a restart")
	}
	e.verifyAudit(t)
}

// TestHSMRotationResumes: a rotation of a token key stopped between
// batches resumes on restart, finding the new key by its .next label.
func TestHSMRotationResumes(t *testing.T) {
	dir := t.TempDir()
	cfg := hsmConfig(t, dir, hsmPIN)
	e := startEnvConfig(t, cfg, keysvc.WithRotateBatch(2), keysvc.WithRotateHook(func(b int) error {
		if b == 2 {
			return errCrash
		}
		return nil
	}))
	v := openVM(t)
	vols := fleet(t, e, v, 3)
	e.admin(t, "POST", "/v1/admin/master-key/rotate", nil, http.StatusAccepted)
	if msg := e.waitRotation(t); !strings.Contains(msg, errCrash.Error()) {
		t.Fatalf("rotation: %q, want the injected crash", msg)
	}
	newKey := e.masterKey(t).Rotation.NewKey
	e.stop(t)

	e = startEnvConfig(t, cfg)
	if msg := e.waitRotation(t); msg != "" {
		t.Fatalf("resumed rotation stopped: %s", msg)
	}
	if fp := e.masterKey(t).Fingerprint; fp != newKey {
		t.Fatalf("fingerprint %s after resume, want %s", fp, newKey)
	}
	if body0(t, e, v, "rot-0", vols["rot-0"]) == nil {
		t.Fatal("no unlock after the resumed rotation")
	}
	e.verifyAudit(t)
	e.stop(t)
	noKeyFiles(t, dir)
}
