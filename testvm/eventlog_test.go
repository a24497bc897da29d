package testvm_test

import (
	"crypto"
	"os"
	"slices"
	"strings"
	"testing"

	"github.com/google/go-eventlog/extract"
	pb "github.com/google/go-eventlog/proto/state"
	"github.com/google/go-eventlog/register"
	"github.com/google/go-eventlog/tpmeventlog"

	"github.com/keygate/keygate/testvm"
)

// TestOVMFDirectBootLog replays a firmware event log captured from the test
// guest (testdata/ovmf-direct-boot.*: `go run ./testvm/cmd/kgvm -script` printing
// binary_bios_measurements and `keygate tpm pcrs --json`) against the PCRs
// read in the same boot, and checks the order of PCR 4's events that
// go-tpm-tools' PCClient parser refuses ("found EFIBootServicesApplication
// in PCR4 before CallingEFIApp event"): OVMF's direct kernel boot measures
// the kernel before "Calling EFI Application from Boot Option". The fixture
// is for attest, which must accept such a log (docs/testvm.md, known gaps).
func TestOVMFDirectBootLog(t *testing.T) {
	raw, err := os.ReadFile("testdata/ovmf-direct-boot.eventlog")
	if err != nil {
		t.Fatal(err)
	}
	js, err := os.ReadFile("testdata/ovmf-direct-boot.pcrs.json")
	if err != nil {
		t.Fatal(err)
	}
	pcrs, err := testvm.ParsePCRsJSON(string(js))
	if err != nil {
		t.Fatal(err)
	}
	ms, err := testvm.ReplayEventLog(raw, pcrs)
	if err != nil {
		t.Fatalf("the captured log does not replay to the captured PCRs: %v", err)
	}
	var pcr4 []string
	for _, m := range ms {
		if m.PCR == 4 {
			pcr4 = append(pcr4, m.Type+" "+m.Data)
		}
	}
	app := slices.IndexFunc(pcr4, func(s string) bool { return strings.HasPrefix(s, "EFI Boot Services Application") })
	calling := slices.IndexFunc(pcr4, func(s string) bool { return strings.Contains(s, "Calling EFI Application") })
	if app < 0 || calling < 0 || app > calling {
		t.Errorf("PCR 4 events %q: want the kernel's boot-services application before \"Calling EFI Application\"", pcr4)
	}
	t.Logf("PCR 4: %q", pcr4)

	// What go-tpm-tools' server.VerifyAttestation runs on the log, with
	// the option (server.VerifyOpts.AllowEFIAppBeforeCallingEvent) that
	// decides whether keysvc can accept this boot's log.
	bank := register.PCRBank{TCGHashAlgo: pb.HashAlgo_SHA256}
	for i, d := range pcrs {
		bank.PCRs = append(bank.PCRs, register.PCR{Index: i, Digest: d, DigestAlg: crypto.SHA256})
	}
	for _, tc := range []struct {
		name    string
		opts    extract.Opts
		wantErr string
	}{
		{"default", extract.Opts{Loader: extract.UnsupportedLoader}, "before CallingEFIApp"},
		{"allow EFI app before calling event", extract.Opts{Loader: extract.UnsupportedLoader, AllowEFIAppBeforeCallingEvent: true}, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := tpmeventlog.ReplayAndExtract(raw, bank, tc.opts)
			switch {
			case tc.wantErr == "" && err != nil:
				t.Errorf("ReplayAndExtract: %v", err)
			case tc.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tc.wantErr)):
				t.Errorf("ReplayAndExtract: %v, want an error containing %q", err, tc.wantErr)
			}
		})
	}
}
