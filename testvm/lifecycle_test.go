package testvm_test

import (
	"context"
	"errors"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/keygate/keygate/internal/testutil"
	"github.com/keygate/keygate/testvm"
)

// TestKillOnTimeout checks that a guest that does not power off in time is
// killed, with swtpm, and leaves no files.
func TestKillOnTimeout(t *testing.T) {
	g := guest(t)
	dir := t.TempDir()
	initrd := filepath.Join(dir, "initrd.cpio")
	if err := g.WriteInitramfs(initrd, nil); err != nil {
		t.Fatal(err)
	}
	cfg := g.Config(initrd)
	cfg.FwCfg = map[string][]byte{"script": []byte("sleep 3600\n")}
	vm, err := testvm.Start(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { vm.Close() })
	// Still in the firmware: the guest cannot have powered off yet.
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	err = vm.Wait(ctx)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Wait = %v, want a deadline error", err)
	}
	if !vm.Exited() {
		t.Errorf("QEMU still runs after Wait timed out")
	}
	assertGone(t, vm)
}

func TestParsePCRsJSON(t *testing.T) {
	zero := strings.Repeat("00", 32)
	tests := []struct {
		name, in, wantErr string
	}{
		{"ok", `{"bank":"sha256","pcrs":{"0":"` + zero + `","9":"` + zero + `"}}`, ""},
		{"sha1 bank", `{"bank":"sha1","pcrs":{"0":"` + zero + `"}}`, "bank"},
		{"short digest", `{"bank":"sha256","pcrs":{"0":"00"}}`, "not a SHA-256"},
		{"bad index", `{"bank":"sha256","pcrs":{"24":"` + zero + `"}}`, "index"},
		{"no pcrs", `{"bank":"sha256","pcrs":{}}`, "no PCRs"},
		{"error text", `keygate: open /dev/tpmrm0: no such file`, "parse"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			p, err := testvm.ParsePCRsJSON(tc.in)
			if tc.wantErr == "" {
				if err != nil || len(p) != 2 {
					t.Fatalf("ParsePCRsJSON = %v, %v", p, err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("err = %v, want one containing %q", err, tc.wantErr)
			}
		})
	}
}

// TestStartErrors covers the ways Start refuses before a guest runs; each
// must name the fix and leave nothing running or on disk (TestMain checks
// the directories).
func TestStartErrors(t *testing.T) {
	fw, err := testvm.FindOVMF()
	if err != nil {
		testutil.Skip(t, "qemu", err.Error())
	}
	testutil.LookPath(t, "swtpm")
	testutil.LookPath(t, "qemu-system-x86_64")
	tests := []struct {
		name    string
		cfg     testvm.Config
		path    string // PATH for the test; unchanged when empty
		wantErr string
	}{
		{"no qemu", testvm.Config{Firmware: fw}, t.TempDir(), "install qemu-system-x86"},
		{"fw_cfg name with a slash", testvm.Config{Firmware: fw, FwCfg: map[string][]byte{"a/b": nil}}, "", "fw_cfg item name"},
		{"share path with a comma", testvm.Config{Firmware: fw, Share: "/tmp/a,b"}, "", "comma"},
		{"no firmware variables", testvm.Config{Firmware: testvm.Firmware{Code: fw.Code, Vars: "/nonexistent/OVMF_VARS.fd"}}, "", "copy OVMF variables"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if tc.path != "" {
				t.Setenv("PATH", tc.path)
			}
			vm, err := testvm.Start(tc.cfg)
			if err == nil {
				vm.Close()
				t.Fatalf("Start succeeded, want an error containing %q", tc.wantErr)
			}
			if !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("Start: %v, want an error containing %q", err, tc.wantErr)
			}
		})
	}
}
