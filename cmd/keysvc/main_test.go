package main

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/keygate/keygate/internal/testutil"
	"github.com/keygate/keygate/keysvc"
	"github.com/keygate/keygate/keysvc/api"
)

func writePubPEM(t *testing.T, path string) {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	der, _ := x509.MarshalPKIXPublicKey(k.Public())
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}), 0o644); err != nil {
		t.Fatal(err)
	}
}

// TestAdminCommands runs the admin subcommands in-process against a real
// service over HTTPS, the way an operator would.
func TestAdminCommands(t *testing.T) {
	data := t.TempDir()
	svc, err := keysvc.Start(context.Background(), keysvc.Config{DataDir: data, Listen: "127.0.0.1:0", AdminListen: "127.0.0.1:0",
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { svc.Shutdown(context.Background()) })
	t.Setenv("KEYSVC_SERVER", "https://"+svc.AdminAddr())
	t.Setenv("KEYSVC_CA", filepath.Join(data, keysvc.CAFile))
	tmp := t.TempDir()
	ek, ak, key, pol := filepath.Join(tmp, "ek.pem"), filepath.Join(tmp, "ak.pem"), filepath.Join(tmp, "key"), filepath.Join(tmp, "pol.json")
	writePubPEM(t, ek)
	writePubPEM(t, ak)
	os.WriteFile(key, []byte("0123456789abcdef0123456789abcdef"), 0o600)
	// cryptsetup's default key file (4 KiB) is over what a TPM-sealed
	// unwrap key holds; 128 bytes is the most.
	bigKey, maxKey := filepath.Join(tmp, "big.key"), filepath.Join(tmp, "max.key")
	os.WriteFile(bigKey, bytes.Repeat([]byte{7}, 4096), 0o600)
	os.WriteFile(maxKey, bytes.Repeat([]byte{8}, api.MaxKeyFile), 0o600)
	os.WriteFile(pol, []byte(`{"pcrs":{"7":["`+strings.Repeat("ab", 32)+`"]}}`), 0o600)
	tok := "--token-file=" + filepath.Join(data, keysvc.AdminTokenFile)

	for _, tc := range []struct {
		args []string
		code int
		out  string // substring of stdout, or of stderr when code != 0
	}{
		{[]string{"vm", "enroll", "--name", "web-1", "--ek-pub", ek, tok}, 0, "keysvc vm set-ak --name web-1"},
		{[]string{"vm", "set-ak", "--name", "web-1", "--ak-pub", ak, tok}, 0, "ak sha256:"},
		{[]string{"vm", "enroll", "--name", "web-1", "--ek-pub", ek, tok}, 1, "already exists"},
		{[]string{"vm", "enroll", "--name", "x", tok}, 1, "--ek-pub or --ek-cert is required"},
		{[]string{"vm", "enroll", "--name", "x", "--ek-cert", ek, tok}, 1, "--ek-roots"},
		{[]string{"vm", "show", "--name", "web-1", tok, "--json"}, 0, `"ak_fingerprint"`},
		{[]string{"volume", "import", "--id", "data", "--vm", "web-1", "--key-file", key, tok}, 0, "volume data (vm web-1)"},
		{[]string{"volume", "import", "--id", "big", "--vm", "web-1", "--key-file", bigKey, tok}, 1, "is 4096 bytes; an unwrap key sealed to a TPM holds at most 128: make a key file of at most 128 bytes"},
		{[]string{"volume", "import", "--id", "max", "--vm", "web-1", "--key-file", maxKey, tok}, 0, "volume max (vm web-1)"},
		{[]string{"volume", "create", "--id", "scratch", "--vm", "web-1", tok, "--json"}, 0, `"id": "scratch"`},
		{[]string{"volume", "create", "--id", "orphan", "--vm", "nobody", tok}, 1, "enroll the VM first"},
		{[]string{"volume", "list", tok}, 0, "scratch\tvm=web-1"},
		{[]string{"volume", "rotate", "--id", "data", tok}, 0, "volume data (vm web-1) erased=false\trotation: pending"},
		{[]string{"volume", "rotate", "--id", "data", tok}, 1, "has a rotation pending since"},
		{[]string{"volume", "rotate", "--id", "nope", tok}, 1, "not found"},
		{[]string{"volume", "rotate", tok}, 1, "--id is required"},
		{[]string{"volume", "list", tok, "--json"}, 0, `"rotation": "pending"`},
		{[]string{"volume", "list", tok}, 0, "data\tvm=web-1\terased=false\trotation: pending"},
		{[]string{"volume", "rotate", "--id", "scratch", tok}, 0, "rotation: pending"},
		{[]string{"volume", "rotate", "--id", "scratch", "--cancel", tok}, 0, "rotation cancelled; the new key is destroyed"},
		{[]string{"volume", "rotate", "--id", "scratch", "--cancel", tok}, 1, "has no rotation pending"},
		{[]string{"policy", "set", "--vm", "web-1", "--file", pol, tok}, 0, `"7"`},
		{[]string{"policy", "show", "--vm", "web-1", tok}, 0, strings.Repeat("ab", 32)},
		{[]string{"policy", "learn", "--vm", "web-1", tok}, 0, "learn mode armed"},
		{[]string{"revoke", "--vm", "web-1", tok, "--json"}, 0, `"revoked": true`},
		{[]string{"erase", "--volume", "scratch", tok}, 0, "erased=true"},
		{[]string{"master-key", "show", tok}, 0, "(file)"},
		{[]string{"master-key", "rotate", tok, "--json"}, 0, `"kind": "file"`},
		{[]string{"master-key", "show", tok, "--json"}, 0, `"fingerprint"`},
		{[]string{"audit", "verify", tok}, 0, "records"},
		{[]string{"audit", "verify", "--token-file", key}, 1, "401"},
		{[]string{"audit", "list", tok}, 0, `"Action": "erase"`},
		{[]string{"serve"}, 1, "--data DIR is required"},
		// --server may list replicas: a dead one first is passed over.
		{[]string{"vm", "list", tok, "--server", testutil.ClosedPort(t) + ",https://" + svc.AdminAddr()}, 0, "web-1"},
		{[]string{"vm", "list", tok, "--server", testutil.ClosedPort(t) + "," + testutil.ClosedPort(t)}, 1, "is `keysvc serve` running?"},
		{[]string{"vm", "list", tok, "--server", "http://" + svc.AdminAddr()}, 1, "https://HOST[:PORT]"},
	} {
		t.Run(strings.Join(tc.args[:min(2, len(tc.args))], "-"), func(t *testing.T) {
			var out, errb bytes.Buffer
			code := run(tc.args, strings.NewReader(""), &out, &errb)
			got := out.String()
			if tc.code != 0 {
				got = errb.String()
			}
			if code != tc.code || !strings.Contains(got, tc.out) {
				t.Fatalf("keysvc %v: exit %d, want %d; stdout %q stderr %q; want %q", tc.args, code, tc.code, out.String(), errb.String(), tc.out)
			}
		})
	}
	var out, errb bytes.Buffer
	if run([]string{"vm", "list", "--json", tok}, nil, &out, &errb) != 0 {
		t.Fatal(errb.String())
	}
	var vms []api.VMInfo
	if err := json.Unmarshal(out.Bytes(), &vms); err != nil || len(vms) != 1 || !vms[0].Revoked {
		t.Fatalf("vm list --json: %v %s", err, out.String())
	}
}
