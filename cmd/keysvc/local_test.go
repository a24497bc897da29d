package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/keygate/keygate/internal/testutil"
	"github.com/keygate/keygate/keysvc"
)

// runCLI runs one command line in-process and returns its exit code, stdout
// and stderr.
func runCLI(args ...string) (int, string, string) {
	var out, errb bytes.Buffer
	code := run(args, strings.NewReader(""), &out, &errb)
	return code, out.String(), errb.String()
}

// swtpmAt starts a swtpm over the state directory state; stop keeps the
// state, so a later swtpmAt(state) is the same TPM after a "reboot".
func swtpmAt(t *testing.T, state string) (sock string, stop func()) {
	return testutil.StartSwtpm(t, state)
}

// TestServeMasterKeyTPM: serve seals a new master key to the TPM, a restart
// of both the TPM and the service unseals it, and starting without the TPM,
// or with another one, fails with the fix in the message.
func TestServeMasterKeyTPM(t *testing.T) {
	data := filepath.Join(t.TempDir(), "data")
	state := t.TempDir()
	sock, stop := swtpmAt(t, state)
	first := serveOnce(t, data, "--master-key-tpm", "swtpm:"+sock)
	if !strings.Contains(first, "master.key.tpm (sealed to TPM swtpm:") || !strings.Contains(first, "created now: [") ||
		!strings.Contains(first, "master.key.tpm") {
		t.Fatalf("first start: %s", first)
	}
	if _, err := os.Stat(filepath.Join(data, keysvc.MasterKeyFile)); !os.IsNotExist(err) {
		t.Fatalf("a plain master key was written: %v", err)
	}
	if fi, err := os.Stat(filepath.Join(data, "master.key.tpm")); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("master.key.tpm: %v %v", err, fi)
	}
	stop()
	sock, _ = swtpmAt(t, state) // the same TPM after a reboot
	if second := serveOnce(t, data, "--master-key-tpm", "swtpm:"+sock); strings.Contains(second, "created now:") {
		t.Fatalf("restart created files: %s", second)
	}
	other, _ := swtpmAt(t, t.TempDir())
	for _, tc := range []struct {
		name  string
		extra []string
		want  string
	}{
		{"no TPM", nil, "--master-key-tpm naming the TPM"},
		{"other TPM", []string{"--master-key-tpm", "swtpm:" + other}, "does not unseal on TPM swtpm:" + other},
		{"missing TPM", []string{"--master-key-tpm", "swtpm:/nonexistent/s"}, "does not exist (start swtpm"},
		{"not a TPM spec", []string{"--master-key-tpm", "/tmp"}, "unknown TPM"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			args := append([]string{"serve", "--data", data, "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"}, tc.extra...)
			code, out, errs := runCLI(args...)
			if code == 0 || !strings.Contains(errs, tc.want) {
				t.Fatalf("exit %d; stdout %q; stderr %q; want %q", code, out, errs, tc.want)
			}
		})
	}
}

// TestServeMasterKeySim: sealing to the in-process simulator works for the
// life of the process (sim is for tests and demos, and serve says so).
func TestServeMasterKeySim(t *testing.T) {
	out := serveOnce(t, filepath.Join(t.TempDir(), "data"), "--master-key-tpm", "sim")
	if !strings.Contains(out, "sealed to TPM sim") {
		t.Fatalf("serve: %s", out)
	}
}

// TestMasterKeySeal: a plain key moves into the TPM, and the service then
// starts only with that TPM.
func TestMasterKeySeal(t *testing.T) {
	data := filepath.Join(t.TempDir(), "data")
	serveOnce(t, data)
	sock, _ := swtpmAt(t, t.TempDir())
	// In order: each case sees what the ones before it left.
	for _, tc := range []struct {
		name string
		args []string
		code int
		want string
	}{
		{"no TPM", []string{"master-key", "seal", "--data", data}, 1, "--master-key-tpm is required"},
		{"simulator", []string{"master-key", "seal", "--data", data, "--master-key-tpm", "sim"}, 1, "new TPM in every process"},
		{"serve before seal", []string{"serve", "--data", data, "--master-key-tpm", "swtpm:" + sock}, 1, "keysvc master-key seal --data"},
		{"seal", []string{"master-key", "seal", "--data", data, "--master-key-tpm", "swtpm:" + sock, "--json"}, 0, `"sealed_file"`},
		{"seal again", []string{"master-key", "seal", "--data", data, "--master-key-tpm", "swtpm:" + sock}, 1, "does not exist"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			code, out, errs := runCLI(tc.args...)
			got := out
			if tc.code != 0 {
				got = errs
			}
			if code != tc.code || !strings.Contains(got, tc.want) {
				t.Fatalf("keysvc %v: exit %d, want %d; stdout %q stderr %q; want %q", tc.args, code, tc.code, out, errs, tc.want)
			}
		})
	}
	serveOnce(t, data, "--master-key-tpm", "swtpm:"+sock)
}

// TestAdminTokenRotate: after a rotation and a restart the old token gets
// 401, the new one works, and the audit chain holds the rotation and still
// verifies.
func TestAdminTokenRotate(t *testing.T) {
	data := filepath.Join(t.TempDir(), "data")
	serveOnce(t, data)
	tokPath := filepath.Join(data, keysvc.AdminTokenFile)
	old, err := os.ReadFile(tokPath)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		args []string
		want string
	}{
		{"no data", []string{"admin-token", "rotate"}, "--data is required"},
		{"not a data dir", []string{"admin-token", "rotate", "--data", t.TempDir()}, "start the service once"},
		{"no master key", []string{"admin-token", "rotate", "--data", noMasterKey(t)}, "restore master.key or master.key.tpm"},
		{"sealed, no TPM given", []string{"admin-token", "rotate", "--data", sealedOnly(t)}, "--master-key-tpm naming the TPM"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if code, _, errs := runCLI(tc.args...); code == 0 || !strings.Contains(errs, tc.want) {
				t.Fatalf("exit %d, stderr %q; want %q", code, errs, tc.want)
			}
		})
	}
	code, out, errs := runCLI("admin-token", "rotate", "--data", data, "--json")
	if code != 0 || !strings.Contains(out, `"restart_required": true`) {
		t.Fatalf("rotate: exit %d; %s %s", code, out, errs)
	}
	cur, err := os.ReadFile(tokPath)
	if err != nil {
		t.Fatal(err)
	}
	if fi, _ := os.Stat(tokPath); fi.Mode().Perm() != 0o600 {
		t.Fatalf("admin.token mode %v, want 0600", fi.Mode().Perm())
	}
	if bytes.Equal(old, cur) || len(strings.TrimSpace(string(cur))) != 64 {
		t.Fatalf("token not replaced by a fresh one: %q -> %q", old, cur)
	}
	if ents, _ := filepath.Glob(filepath.Join(data, ".admin.token*")); len(ents) != 0 {
		t.Fatalf("temporary files left: %v", ents)
	}

	svc, err := keysvc.Start(context.Background(), keysvc.Config{DataDir: data, Listen: "127.0.0.1:0", AdminListen: "127.0.0.1:0",
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	defer svc.Shutdown(context.Background())
	hc := adminClient(t, data)
	for _, tc := range []struct {
		name string
		tok  []byte
		want int
	}{
		{"old token", old, http.StatusUnauthorized},
		{"new token", cur, http.StatusOK},
	} {
		t.Run(tc.name, func(t *testing.T) {
			req, _ := http.NewRequest("GET", "https://"+svc.AdminAddr()+"/v1/admin/vms", nil)
			req.Header.Set("Authorization", "Bearer "+strings.TrimSpace(string(tc.tok)))
			resp, err := hc.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			if resp.StatusCode != tc.want {
				t.Fatalf("status %d, want %d", resp.StatusCode, tc.want)
			}
		})
	}
	srv, ca, tf := "--server=https://"+svc.AdminAddr(), "--ca="+filepath.Join(data, keysvc.CAFile), "--token-file="+tokPath
	if code, out, errs := runCLI("audit", "verify", srv, ca, tf); code != 0 {
		t.Fatalf("audit verify: %s %s", out, errs)
	}
	code, out, errs = runCLI("audit", "list", srv, ca, tf)
	if code != 0 {
		t.Fatalf("audit list: %s", errs)
	}
	var recs []struct{ Action, Subject, Actor string }
	if err := json.Unmarshal([]byte(out), &recs); err != nil {
		t.Fatalf("audit list: %v: %s", err, out)
	}
	found := false
	for _, r := range recs {
		found = found || r.Action == "rotate" && r.Subject == "admin-token" && r.Actor == "operator"
	}
	if !found || strings.Contains(out, strings.TrimSpace(string(cur))) {
		t.Fatalf("audit has no rotation record (or holds the token): %s", out)
	}
}

func adminClient(t *testing.T, data string) *http.Client {
	t.Helper()
	pem, err := os.ReadFile(filepath.Join(data, keysvc.CAFile))
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(pem)
	return &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS13}}}
}

// noMasterKey returns a data directory with a database and a token but no
// master key (lost, or not restored from backup).
func noMasterKey(t *testing.T) string {
	dir := t.TempDir()
	for _, f := range []string{"keysvc.db", keysvc.AdminTokenFile} {
		if err := os.WriteFile(filepath.Join(dir, f), nil, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

// sealedOnly is noMasterKey with a sealed master key in place.
func sealedOnly(t *testing.T) string {
	dir := noMasterKey(t)
	if err := os.WriteFile(filepath.Join(dir, "master.key.tpm"), []byte("blob"), 0o600); err != nil {
		t.Fatal(err)
	}
	return dir
}
