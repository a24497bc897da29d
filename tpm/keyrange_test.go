package tpm_test

import (
	"testing"
	"unsafe"

	"github.com/keygate/keygate/keymem"
	"github.com/keygate/keygate/tpm"
)

// TestImportRegistersKeyPages: the key Import returns is in the key-page
// registry (which a monitor of this process follows) until Destroy, and
// Destroy twice is harmless.
func TestImportRegistersKeyPages(t *testing.T) {
	tp := openChecked(t, "sim")
	ek, err := tp.EK(tpm.ECC)
	if err != nil {
		t.Fatal(err)
	}
	before := len(keymem.Default.Ranges())
	uk, err := tp.Import(createBlob(t, ek.Key, []byte("0123456789abcdef0123456789abcdef"), nil), tpm.ECC)
	if err != nil {
		t.Fatal(err)
	}
	lo := uint64(uintptr(unsafe.Pointer(&uk.Bytes()[0])))
	hi := lo + uint64(len(uk.Bytes()))
	covered := false
	for _, r := range keymem.Default.Ranges() {
		covered = covered || r.Start <= lo && hi <= r.End
	}
	if !covered {
		t.Fatalf("imported key %#x-%#x not in the registry %v", lo, hi, keymem.Default.Ranges())
	}
	uk.Destroy()
	uk.Destroy()
	if n := len(keymem.Default.Ranges()); n != before {
		t.Fatalf("%d ranges registered after Destroy, %d before Import", n, before)
	}
}
