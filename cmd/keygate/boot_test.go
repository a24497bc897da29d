package main

import (
	"bytes"
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/hugelgupf/p9/p9"

	"github.com/keygate/keygate/internal/testutil"
	"github.com/keygate/keygate/keysvc"
	"github.com/keygate/keygate/keysvc/api"
	"github.com/keygate/keygate/keysvc/client"
	"github.com/keygate/keygate/tpm"
)

// ksEnv is a real key service in a temporary directory, with the files a
// user would pass to keygate: ca.pem and admin.token.
type ksEnv struct {
	svc               *keysvc.Service
	caFile, tokenFile string
	adm               *client.Client // the admin API
	token             string
}

func startKeysvc(t *testing.T) *ksEnv {
	t.Helper()
	dir := t.TempDir()
	svc, err := keysvc.Start(context.Background(), keysvc.Config{DataDir: dir, Listen: "127.0.0.1:0", AdminListen: "127.0.0.1:0", Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { svc.Shutdown(context.Background()) })
	e := &ksEnv{svc: svc, caFile: filepath.Join(dir, keysvc.CAFile), tokenFile: filepath.Join(dir, keysvc.AdminTokenFile)}
	ca, _ := os.ReadFile(e.caFile)
	tok, _ := os.ReadFile(e.tokenFile)
	e.token = strings.TrimSpace(string(tok))
	if e.adm, err = client.New(client.Config{URLs: []string{"https://" + svc.AdminAddr()}, CA: ca, Token: e.token}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(e.adm.Close)
	return e
}

func (e *ksEnv) admin(t *testing.T, method, path string, body any, want int) {
	t.Helper()
	err := e.adm.Do(context.Background(), method, path, "", body, nil)
	var se *client.Error
	if !(err == nil && want/100 == 2) && !(errors.As(err, &se) && se.StatusCode == want) {
		t.Fatalf("%s %s: %v, want %d", method, path, err, want)
	}
}

// enrollSwtpm enrolls the swtpm at sock as vm with a policy on PCRs 0, 7
// and 15 as they are now.
func (e *ksEnv) enrollSwtpm(t *testing.T, sock, vm string) {
	t.Helper()
	tp, err := tpm.Open("swtpm:" + sock)
	if err != nil {
		t.Fatal(err)
	}
	defer tp.Close()
	ek, _ := tp.EK(tpm.ECC)
	ak, _ := tp.AK(tpm.ECC)
	ekPEM, _ := ek.PEM()
	akPEM, _ := ak.PEM()
	e.admin(t, "POST", "/v1/admin/vms", api.EnrollRequest{Name: vm, EKPub: string(ekPEM), AKPub: string(akPEM)}, http.StatusCreated)
	pcrs, err := tp.PCRs(0, 7, tpm.WindowPCR)
	if err != nil {
		t.Fatal(err)
	}
	m := map[string][]string{}
	for i, v := range pcrs.GetPcrs() {
		m[strconv.Itoa(int(i))] = []string{hex.EncodeToString(v)}
	}
	e.admin(t, "PUT", "/v1/admin/vms/"+vm+"/policy", map[string]any{"pcrs": m}, http.StatusOK)
}

// keygate runs the CLI in-process and returns its exit code and output.
func runKeygate(args ...string) (int, string, string) {
	var out, errb bytes.Buffer
	code := run(args, strings.NewReader(""), &out, &errb)
	return code, out.String(), errb.String()
}

// TestBootCLI drives `keygate disk create --keysvc` and `keygate boot`
// against a real key service and a real swtpm, as a user would.
func TestBootCLI(t *testing.T) {
	tests := []struct {
		name string
		// before runs on the swtpm after enrollment, before boot.
		before   func(t *testing.T, sock string)
		wantCode int
		wantErr  []string // in stderr
		serving  bool     // boot serves; the test revokes it
		// monitor adds --monitor --on-alert lock (root only); the test then
		// opens the serving process's /proc/PID/mem instead of revoking.
		monitor bool
		// deadFirst lists a dead replica before the key service in
		// disk create's --keysvc, and boot takes the list from the token.
		deadFirst bool
	}{
		{name: "serves-until-revoked", serving: true, wantCode: 1, wantErr: []string{"unlocked (ext4); PCR 15 extended", "serving 9P2000.L", "session revoked"}},
		{name: "dead-replica-first", serving: true, deadFirst: true, wantCode: 1, wantErr: []string{"unlocked (ext4); PCR 15 extended", "session revoked"}},
		{name: "monitor-locks-on-alert", serving: true, monitor: true, wantCode: 1, wantErr: []string{"key-page monitor running in", "the first critical alert locks the volume",
			"monitor alert: critical proc_mem", "locked on a critical monitor alert"}},
		{name: "denied", wantCode: 1, wantErr: []string{"key service refused (policy)", "PCR 7: got "},
			before: func(t *testing.T, sock string) {
				tp, err := tpm.Open("swtpm:" + sock)
				if err != nil {
					t.Fatal(err)
				}
				defer tp.Close()
				if err := tp.Extend(7, []byte("another boot loader")); err != nil {
					t.Fatal(err)
				}
			}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if tc.monitor {
				testutil.Root(t)
			}
			sock, _ := testutil.StartSwtpm(t, "")
			e := startKeysvc(t)
			e.enrollSwtpm(t, sock, "web1")
			img := filepath.Join(t.TempDir(), "v.img")
			url := "https://" + e.svc.VMAddr()
			if tc.deadFirst {
				url = testutil.ClosedPort(t) + "," + url
			}
			code, out, errOut := runKeygate("disk", "create", img, "--size", "64M", "--fs", "ext4", "--keysvc", url, "--volume", "web1-data",
				"--vm", "web1", "--ca", e.caFile, "--admin", "https://"+e.svc.AdminAddr(), "--token-file", e.tokenFile)
			if code != 0 || !strings.Contains(out, "created "+img) {
				t.Fatalf("disk create: %d %s %s", code, out, errOut)
			}
			if code, out, _ := runKeygate("disk", "info", img); code != 0 || !strings.Contains(out, "keygate, keyslots [0]") {
				t.Fatalf("disk info shows no keygate token: %s", out)
			} else if want := "volume web1-data, CA sha256 " + e.svc.Data.CAFingerprint; !strings.Contains(out, want) {
				t.Fatalf("disk info does not show the token's CA (%q): %s", want, out)
			}
			if tc.before != nil {
				tc.before(t, sock)
			}
			sockDir, _ := os.MkdirTemp("", "kgc")
			defer os.RemoveAll(sockDir)
			p9sock := filepath.Join(sockDir, "9p")
			type result struct {
				code      int
				out, errs string
			}
			done := make(chan result, 1)
			args := []string{"boot", "--vm", "web1", "--image", img, "--tpm", "swtpm:" + sock, "--ca", e.caFile, "--serve-9p", p9sock, "--poll", "100ms", "--max-wait", "10s"}
			if tc.monitor {
				args = append(args, "--monitor", "--on-alert", "lock")
			}
			if tc.deadFirst {
				args = append(args, "--connect-timeout", "200ms")
			}
			go func() {
				c, o, e := runKeygate(args...)
				done <- result{c, o, e}
			}()
			if tc.serving {
				waitSocket(t, p9sock, done)
				conn, err := net.Dial("unix", p9sock)
				if err != nil {
					t.Fatal(err)
				}
				c, err := p9.NewClient(conn)
				if err != nil {
					t.Fatal(err)
				}
				root, err := c.Attach("")
				if err != nil {
					t.Fatal(err)
				}
				f, _, _, err := root.Create("hello", p9.WriteOnly, 0o644, p9.NoUID, p9.NoGID)
				if err != nil {
					t.Fatalf("9P create: %v", err)
				}
				if _, err := f.WriteAt([]byte("hi"), 0); err != nil {
					t.Fatalf("9P write: %v", err)
				}
				f.Close()
				c.Close()
				if tc.monitor {
					// keygate boot runs in this process: attack it from a child.
					// The open is the alert; what cat reads does not matter.
					exec.Command("cat", fmt.Sprintf("/proc/%d/mem", os.Getpid())).Run()
				} else {
					e.admin(t, "POST", "/v1/admin/vms/web1/revoke", nil, http.StatusOK)
				}
			}
			var r result
			select {
			case r = <-done:
			case <-time.After(60 * time.Second):
				t.Fatal("keygate boot did not return within 60s")
			}
			if tc.monitor {
				t.Logf("keygate boot --monitor --on-alert lock, stderr:\n%s", r.errs)
			}
			if r.code != tc.wantCode {
				t.Fatalf("exit %d, want %d; stderr:\n%s", r.code, tc.wantCode, r.errs)
			}
			for _, w := range tc.wantErr {
				if !strings.Contains(r.errs, w) {
					t.Errorf("stderr lacks %q:\n%s", w, r.errs)
				}
			}
		})
	}
}

// waitSocket waits until a keygate process serves on the unix socket
// path, failing with what the process left on done if it ends first. The
// bound is for a hang.
func waitSocket[T any](t *testing.T, path string, done chan T) {
	t.Helper()
	for deadline := time.Now().Add(60 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		select {
		case r := <-done:
			t.Fatalf("keygate ended before serving on %s: %+v", path, r)
		default:
		}
		if c, err := net.Dial("unix", path); err == nil {
			c.Close()
			return
		}
	}
	t.Fatalf("nothing serves on %s within 60s", path)
}

// TestBootUsage: the contract's mistakes are usage errors, before any
// TPM or network is touched.
func TestBootUsage(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"boot"}, "--vm, --image and --tpm are required"},
		{[]string{"boot", "--vm", "a", "--image", "x", "--on-alert", "lock"}, "--on-alert lock needs --monitor"},
		{[]string{"boot", "--vm", "a", "--image", "x", "--on-alert", "panic"}, "use log or lock"},
		{[]string{"boot", "--vm", "a", "--image", "/nonexistent/x"}, "open image"},
		{[]string{"boot", "--vm", "a", "--image", "x", "--serve-9p", "a", "--serve-nbd", "b"}, "exclusive"},
		{[]string{"boot", "--vm", "a", "--image", "x", "--serve-9p", "a", "--attach", "/dev/nbd0"}, "exclusive"},
		{[]string{"boot", "--vm", "a", "--image", "x", "--allow-uid", "-1"}, "not a numeric uid"},
		{[]string{"boot", "--vm", "a", "--image", "x", "--reattest", "-1s"}, "--reattest -1s: use a positive duration up to 1h0m0s, or 0"},
		{[]string{"boot", "--vm", "a", "--image", "x", "--reattest", "2h"}, "--reattest 2h0m0s: use a positive duration up to 1h0m0s, or 0"},
		{[]string{"disk", "create", "x.img", "--size", "64M", "--keysvc", "https://h", "--volume", "v"}, "--vm is required with --keysvc"},
		{[]string{"disk", "create", "x.img", "--size", "64M", "--keysvc", "https://h", "--volume", "v", "--key-file", "k"}, "not both"},
	} {
		t.Run(strings.Join(tc.args, " "), func(t *testing.T) {
			code, _, errs := runKeygate(tc.args...)
			if code == 0 || !strings.Contains(errs, tc.want) {
				t.Fatalf("exit %d, stderr %q; want failure saying %q", code, errs, tc.want)
			}
		})
	}
}
