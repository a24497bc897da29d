package testutil

import (
	"os"
	"os/exec"
	"path/filepath"
	"testing"
)

// SoftHSMModule is where Debian's softhsm2 package puts its PKCS#11 module.
const SoftHSMModule = "/usr/lib/softhsm/libsofthsm2.so"

// SoftHSM gives the test a SoftHSM2 of its own: a token directory and
// config in a temporary directory (SOFTHSM2_CONF points to it for the rest
// of the test, so the test must not be parallel), with one token
// initialised under label with the user PIN pin. It returns the module's
// path. It skips (or fails, see Skip) without softhsm2.
func SoftHSM(t testing.TB, label, pin string) string {
	t.Helper()
	LookPath(t, "softhsm2-util")
	if _, err := os.Stat(SoftHSMModule); err != nil {
		Skip(t, "softhsm", "no "+SoftHSMModule+" (apt-get install softhsm2)")
	}
	dir := t.TempDir()
	tokens := filepath.Join(dir, "tokens")
	if err := os.Mkdir(tokens, 0o700); err != nil {
		t.Fatal(err)
	}
	conf := filepath.Join(dir, "softhsm2.conf")
	if err := os.WriteFile(conf, []byte("directories.tokendir = "+tokens+"\nobjectstore.backend = file\nlog.level = ERROR\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Setenv("SOFTHSM2_CONF", conf)
	AddSoftHSMToken(t, label, pin)
	return SoftHSMModule
}

// AddSoftHSMToken initialises another token in the test's SoftHSM.
func AddSoftHSMToken(t testing.TB, label, pin string) {
	t.Helper()
	util := LookPath(t, "softhsm2-util")
	out, err := exec.Command(util, "--init-token", "--free", "--label", label, "--pin", pin, "--so-pin", "so-"+pin).CombinedOutput()
	if err != nil {
		t.Fatalf("softhsm2-util --init-token: %v\n%s", err, out)
	}
}
