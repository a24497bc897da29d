package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/keygate/keygate/internal/testutil"
	"github.com/keygate/keygate/keysvc"
)

// TestServePKCS11 runs `keysvc serve --master-key-pkcs11` on a SoftHSM2
// token: it says where the key is, writes no key file, and refuses a PIN
// file others can read, a PIN in the URI, and a bad URI, with the fix.
func TestServePKCS11(t *testing.T) {
	module := testutil.SoftHSM(t, "cli", "1234")
	dir := t.TempDir()
	pin := filepath.Join(dir, "pin")
	os.WriteFile(pin, []byte("1234\n"), 0o600)
	data := filepath.Join(dir, "data")
	uri := "pkcs11:token=cli;object=master"
	out := serveOnce(t, data, "--master-key-pkcs11", uri, "--pkcs11-module", module, "--pkcs11-pin-file", pin)
	if !strings.Contains(out, uri+" (in the HSM, non-extractable)") || !strings.Contains(out, "pkcs11:master") {
		t.Fatalf("serve output: %s", out)
	}
	if _, err := os.Stat(filepath.Join(data, keysvc.MasterKeyFile)); !os.IsNotExist(err) {
		t.Fatalf("master.key written: %v", err)
	}
	loose := filepath.Join(dir, "loose")
	os.WriteFile(loose, []byte("1234"), 0o644)
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--master-key-pkcs11", uri, "--pkcs11-module", module, "--pkcs11-pin-file", loose}, "chmod 600"},
		{[]string{"--master-key-pkcs11", uri + "?pin-value=1234", "--pkcs11-module", module, "--pkcs11-pin-file", pin}, "process listings"},
		{[]string{"--master-key-pkcs11", "pkcs11:object=m", "--pkcs11-module", module, "--pkcs11-pin-file", pin}, "no token="},
		{[]string{"--master-key-pkcs11", uri, "--pkcs11-module", module}, "--pkcs11-pin-file"},
		{[]string{"--pkcs11-module", module}, "go with --master-key-pkcs11"},
		{[]string{"--master-key-pkcs11", uri, "--master-key-tpm", "sim", "--pkcs11-pin-file", pin}, "not both"},
	} {
		var o, e bytes.Buffer
		code := run(append([]string{"serve", "--data", data, "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"}, tc.args...), nil, &o, &e)
		if code == 0 || !strings.Contains(e.String(), tc.want) {
			t.Errorf("serve %v: exit %d, stderr %q, want %q", tc.args, code, e.String(), tc.want)
		}
	}
}
