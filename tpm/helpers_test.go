package tpm_test

import (
	"flag"
	"github.com/keygate/keygate/internal/tpmtest"
	"os"
	"testing"

	"github.com/keygate/keygate/internal/testutil"
	"github.com/keygate/keygate/tpm"
)

// -tpm (or KEYGATE_TPM) adds a real TPM, e.g. /dev/tpmrm0, to the backends
// every test runs on. Tests that extend PCRs skip it unless
// KEYGATE_TPM_EXTEND=1, since an extend lasts until the machine reboots.
var hwTPM = flag.String("tpm", os.Getenv("KEYGATE_TPM"), "also run the TPM tests on this TPM (e.g. /dev/tpmrm0); default $KEYGATE_TPM")

// backend is one TPM the tests run on.
type backend struct {
	name string
	open func(t *testing.T) *tpm.TPM
}

// backends returns the simulator, a fresh swtpm per test, and the real TPM
// named by -tpm (skipped with a reason when none is named; failing when
// KEYGATE_REQUIRE names tpm-device and the named device is missing).
func backends() []backend {
	b := []backend{
		{"sim", func(t *testing.T) *tpm.TPM { return openChecked(t, "sim") }},
		{"swtpm", func(t *testing.T) *tpm.TPM { return openChecked(t, "swtpm:"+startSwtpm(t)) }},
	}
	b = append(b, backend{"device", func(t *testing.T) *tpm.TPM {
		if *hwTPM == "" {
			t.Skip("skipping: no real TPM named (run with -tpm /dev/tpmrm0 or KEYGATE_TPM=/dev/tpmrm0)")
		}
		if _, err := os.Stat(*hwTPM); err != nil {
			testutil.Skip(t, "tpm-device", err.Error())
		}
		return openChecked(t, *hwTPM)
	}})
	return b
}

// onEachTPM runs f as a subtest on every backend.
func onEachTPM(t *testing.T, f func(t *testing.T, tp *tpm.TPM)) {
	t.Helper()
	for _, b := range backends() {
		t.Run(b.name, func(t *testing.T) { f(t, b.open(t)) })
	}
}

// mayExtend skips tests that extend PCRs on real hardware unless asked.
func mayExtend(t *testing.T, tp *tpm.TPM) {
	t.Helper()
	if tp.Kind() == tpm.Device && os.Getenv("KEYGATE_TPM_EXTEND") != "1" {
		t.Skip("skipping: extends PCRs of a real TPM until reboot; set KEYGATE_TPM_EXTEND=1 to allow")
	}
}

// openChecked opens spec and, in Cleanup, fails the test if any transient
// object or session was left loaded, then closes the TPM.
func openChecked(t *testing.T, spec string) *tpm.TPM {
	t.Helper()
	return tpmtest.Open(t, spec)
}

// startSwtpm starts a swtpm with a fresh state and returns its server
// socket; it is stopped and its files removed in Cleanup.
func startSwtpm(t *testing.T) string {
	sock, _ := testutil.StartSwtpm(t, "")
	return sock
}
