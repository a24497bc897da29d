package masterkey_test

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/awnumar/memguard"

	"github.com/keygate/keygate/internal/testutil"
	"github.com/keygate/keygate/keysvc/masterkey"
	"github.com/keygate/keygate/tpm"
)

// fakeTPM is a Sealer whose blobs only it opens: its name, then the secret.
// It lets the file handling be tested without a TPM; the real TPM is tested
// below on swtpm and the simulator.
type fakeTPM struct {
	name      string
	sealErr   error
	corrupted bool // Seal returns a blob that unseals to other bytes
}

func (f *fakeTPM) Spec() string { return f.name }

func (f *fakeTPM) Seal(secret []byte) ([]byte, error) {
	if f.sealErr != nil {
		return nil, f.sealErr
	}
	out := append([]byte(f.name+":"), secret...)
	if f.corrupted {
		out[len(out)-1] ^= 1
	}
	return out, nil
}

func (f *fakeTPM) Unseal(blob []byte) (*memguard.LockedBuffer, error) {
	rest, ok := bytes.CutPrefix(blob, []byte(f.name+":"))
	if !ok {
		return nil, tpm.ErrSealedElsewhere
	}
	return memguard.NewBufferFromBytes(bytes.Clone(rest)), nil
}

func TestLoadOrCreateSealed(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "master.key")
	a := &fakeTPM{name: "a"}
	k1, created, err := masterkey.LoadOrCreateSealed(path, a)
	if err != nil || !created {
		t.Fatalf("first call: created=%v err=%v", created, err)
	}
	defer k1.Destroy()
	if _, err := os.Stat(path); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("a plain key file appeared: %v", err)
	}
	fi, err := os.Stat(path + masterkey.SealedSuffix)
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("sealed file: %v, mode %v; want 0600", err, fi.Mode().Perm())
	}
	k2, created, err := masterkey.LoadOrCreateSealed(path, a)
	if err != nil || created {
		t.Fatalf("second call: created=%v err=%v", created, err)
	}
	defer k2.Destroy()
	if !sameKey(t, k1, k2) {
		t.Fatal("second call unsealed a different key")
	}
	// Through the hook, as keysvc.Start reaches it.
	release := masterkey.UseSealer(path, a)
	k3, created, err := masterkey.LoadOrCreate(path)
	release()
	if err != nil || created || !sameKey(t, k1, k3) {
		t.Fatalf("LoadOrCreate with UseSealer: created=%v err=%v", created, err)
	}
	k3.Destroy()
	noTempFiles(t, dir)
}

func TestSealedRefuses(t *testing.T) {
	for _, tc := range []struct {
		name  string
		setup func(t *testing.T, path string) // before the call
		s     masterkey.Sealer
		plain bool // call LoadOrCreate with no sealer
		want  error
		hint  string
	}{
		{"other TPM", sealWith(&fakeTPM{name: "a"}), &fakeTPM{name: "b"}, false, masterkey.ErrSealed, "naming the TPM it was sealed to"},
		{"no TPM given", sealWith(&fakeTPM{name: "a"}), nil, true, masterkey.ErrSealed, "--master-key-tpm"},
		{"plain key present", plainKey, &fakeTPM{name: "a"}, false, masterkey.ErrKeyFile, "keysvc master-key seal"},
		{"both present", func(t *testing.T, p string) {
			plainKey(t, p)
			os.WriteFile(p+masterkey.SealedSuffix, []byte("a:0123456789abcdef0123456789abcdef"), 0o600)
		}, &fakeTPM{name: "a"}, false, masterkey.ErrKeyFile, "remove it"},
		{"group readable", func(t *testing.T, p string) {
			sealWith(&fakeTPM{name: "a"})(t, p)
			os.Chmod(p+masterkey.SealedSuffix, 0o640)
		}, &fakeTPM{name: "a"}, false, masterkey.ErrKeyFile, "chmod 600"},
		{"wrong length", func(t *testing.T, p string) {
			os.WriteFile(p+masterkey.SealedSuffix, []byte("a:short"), 0o600)
		}, &fakeTPM{name: "a"}, false, masterkey.ErrKeyFile, "restore it from backup"},
		{"seal fails", nil, &fakeTPM{name: "a", sealErr: errors.New("TPM busy")}, false, nil, "TPM busy"},
		{"blob does not round-trip", nil, &fakeTPM{name: "a", corrupted: true}, false, nil, "unseals to a different key"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			path := filepath.Join(dir, "master.key")
			if tc.setup != nil {
				tc.setup(t, path)
			}
			var err error
			var k *masterkey.Key
			if tc.plain {
				k, _, err = masterkey.LoadOrCreate(path)
			} else {
				k, _, err = masterkey.LoadOrCreateSealed(path, tc.s)
			}
			if err == nil {
				k.Destroy()
				t.Fatal("succeeded")
			}
			if tc.want != nil && !errors.Is(err, tc.want) {
				t.Errorf("error %v; want %v", err, tc.want)
			}
			if !strings.Contains(err.Error(), tc.hint) {
				t.Errorf("error %q does not say %q", err, tc.hint)
			}
			if tc.setup == nil { // nothing was there: nothing may be left
				if ents, _ := os.ReadDir(dir); len(ents) != 0 {
					t.Errorf("failure left %d files in %s", len(ents), dir)
				}
			}
		})
	}
}

func sealWith(s masterkey.Sealer) func(t *testing.T, path string) {
	return func(t *testing.T, path string) {
		t.Helper()
		k, _, err := masterkey.LoadOrCreateSealed(path, s)
		if err != nil {
			t.Fatal(err)
		}
		k.Destroy()
	}
}

func plainKey(t *testing.T, path string) {
	t.Helper()
	k, _, err := masterkey.LoadOrCreate(path)
	if err != nil {
		t.Fatal(err)
	}
	k.Destroy()
}

func TestSealExisting(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "master.key")
	plain, _, err := masterkey.LoadOrCreate(path)
	if err != nil {
		t.Fatal(err)
	}
	defer plain.Destroy()
	a := &fakeTPM{name: "a"}
	if err := masterkey.SealExisting(path, a); err != nil {
		t.Fatalf("SealExisting: %v", err)
	}
	if _, err := os.Stat(path); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("plain key still there: %v", err)
	}
	sealed, created, err := masterkey.LoadOrCreateSealed(path, a)
	if err != nil || created {
		t.Fatalf("load sealed: created=%v err=%v", created, err)
	}
	defer sealed.Destroy()
	if !sameKey(t, plain, sealed) {
		t.Fatal("the sealed key is not the plain one")
	}
	if err := masterkey.SealExisting(path, a); err == nil || !strings.Contains(err.Error(), "does not exist") {
		t.Fatalf("second SealExisting: %v; want a missing-file error", err)
	}
	noTempFiles(t, dir)
}

// TestSealedOnSimulator: the simulator is a fresh TPM in each process, so a
// key sealed to it round-trips only within one process; this is that round
// trip, with no transient handle left behind.
func TestSealedOnSimulator(t *testing.T) {
	tp, err := tpm.Open("sim")
	if errors.Is(err, tpm.ErrNotSupported) {
		testutil.Skip(t, "sim", err.Error())
	}
	if err != nil {
		t.Fatal(err)
	}
	defer tp.Close()
	path := filepath.Join(t.TempDir(), "master.key")
	k1, created, err := masterkey.LoadOrCreateSealed(path, tp)
	if err != nil || !created {
		t.Fatalf("create: created=%v err=%v", created, err)
	}
	defer k1.Destroy()
	k2, _, err := masterkey.LoadOrCreateSealed(path, tp)
	if err != nil {
		t.Fatalf("load: %v", err)
	}
	defer k2.Destroy()
	if !sameKey(t, k1, k2) {
		t.Fatal("unsealed a different key")
	}
	noLeaks(t, tp)
}

// TestSealedAcrossSwtpmRestart: a key sealed to a swtpm unseals after that
// swtpm restarts from its state directory (as a host TPM survives a reboot),
// and not on another swtpm.
func TestSealedAcrossSwtpmRestart(t *testing.T) {
	state := t.TempDir()
	path := filepath.Join(t.TempDir(), "master.key")
	tp := runSwtpm(t, state)
	k1, created, err := masterkey.LoadOrCreateSealed(path, tp)
	if err != nil || !created {
		t.Fatalf("create: created=%v err=%v", created, err)
	}
	defer k1.Destroy()
	noLeaks(t, tp)
	tp.stop()

	tp = runSwtpm(t, state)
	k2, created, err := masterkey.LoadOrCreateSealed(path, tp)
	if err != nil || created {
		t.Fatalf("after restart: created=%v err=%v", created, err)
	}
	defer k2.Destroy()
	if !sameKey(t, k1, k2) {
		t.Fatal("unsealed a different key after restart")
	}
	noLeaks(t, tp)
	tp.stop()

	other := runSwtpm(t, t.TempDir())
	_, _, err = masterkey.LoadOrCreateSealed(path, other)
	if !errors.Is(err, masterkey.ErrSealed) || !errors.Is(err, tpm.ErrSealedElsewhere) {
		t.Fatalf("other swtpm: %v; want ErrSealed naming another TPM", err)
	}
	noLeaks(t, other)
}

func noLeaks(t *testing.T, tp interface{ TransientHandles() ([]uint32, error) }) {
	t.Helper()
	hs, err := tp.TransientHandles()
	if err != nil {
		t.Fatalf("list transient handles: %v", err)
	}
	if len(hs) != 0 {
		t.Fatalf("leaked %d transient handles: %#x", len(hs), hs)
	}
}

// swtpmProc is a swtpm process and the TPM opened on it.
type swtpmProc struct {
	*tpm.TPM
	stop func()
}

// runSwtpm starts swtpm over the state directory state and opens it; stop
// (also run in Cleanup) closes the TPM and ends the process, keeping state.
func runSwtpm(t *testing.T, state string) *swtpmProc {
	t.Helper()
	sock, stopSwtpm := testutil.StartSwtpm(t, state)
	p := &swtpmProc{}
	p.stop = func() {
		if p.TPM != nil {
			p.TPM.Close()
			p.TPM = nil
		}
		stopSwtpm()
	}
	t.Cleanup(p.stop)
	tp, err := tpm.Open("swtpm:" + sock)
	if err != nil {
		t.Fatalf("open swtpm: %v", err)
	}
	p.TPM = tp
	return p
}
