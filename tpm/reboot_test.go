package tpm_test

import (
	"bytes"
	"strings"
	"testing"

	"github.com/keygate/keygate/tpm"
)

func TestReboot(t *testing.T) {
	tp := openChecked(t, "sim")
	ek1, err := tp.EK(tpm.ECC)
	if err != nil {
		t.Fatal(err)
	}
	before, err := tp.PCRs(tpm.WindowPCR)
	if err != nil {
		t.Fatal(err)
	}
	if err := tp.Extend(tpm.WindowPCR, []byte("unlock done")); err != nil {
		t.Fatal(err)
	}
	if err := tp.Reboot(); err != nil {
		t.Fatal(err)
	}
	after, err := tp.PCRs(tpm.WindowPCR)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(before.Pcrs[tpm.WindowPCR], after.Pcrs[tpm.WindowPCR]) {
		t.Errorf("PCR %d after reboot = %x, want its reset value %x", tpm.WindowPCR, after.Pcrs[tpm.WindowPCR], before.Pcrs[tpm.WindowPCR])
	}
	ek2, err := tp.EK(tpm.ECC)
	if err != nil {
		t.Fatal(err)
	}
	fp1, err1 := ek1.Fingerprint()
	fp2, err2 := ek2.Fingerprint()
	if err1 != nil || err2 != nil || fp1 != fp2 {
		t.Error("the EK changed across a reboot; enrolled VMs would no longer match")
	}
}

func TestRebootRefusesRealTPMs(t *testing.T) {
	tp := openChecked(t, "swtpm:"+startSwtpm(t))
	err := tp.Reboot()
	if err == nil || !strings.Contains(err.Error(), "only the in-process simulator") {
		t.Fatalf("Reboot of %s: %v, want a refusal naming the simulator", tp.Spec(), err)
	}
}
