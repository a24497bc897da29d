// Package tpmtest opens TPMs for keygate's tests and checks, when each test
// ends, that it left no transient object or session loaded: on a swtpm or a
// real TPM without a resource manager a leak fills the object slots, and a
// test is where it shows first.
package tpmtest

import (
	"errors"
	"testing"

	"github.com/keygate/keygate/internal/testutil"
	"github.com/keygate/keygate/tpm"
)

// Open opens spec ("sim", "swtpm:SOCKET" or a device path) and registers a
// Cleanup that fails the test if transient handles are left, then closes
// the TPM. The simulator skips, or fails where KEYGATE_REQUIRE names "sim",
// in a build without cgo.
func Open(t testing.TB, spec string) *tpm.TPM {
	t.Helper()
	tp, err := tpm.Open(spec)
	if spec == "sim" && errors.Is(err, tpm.ErrNotSupported) {
		testutil.Skip(t, "sim", err.Error())
	}
	if err != nil {
		t.Fatalf("Open(%q): %v", spec, err)
	}
	t.Cleanup(func() {
		defer tp.Close()
		hs, err := tp.TransientHandles()
		if err != nil {
			t.Errorf("list transient handles: %v", err)
			return
		}
		if len(hs) > 0 {
			t.Errorf("leaked %d transient handles/sessions: %#x", len(hs), hs)
		}
	})
	return tp
}
