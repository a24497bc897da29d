package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"io"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/keygate/keygate/internal/testutil"
	"github.com/keygate/keygate/tpm"
)

// needSim skips when this build has no TPM simulator (cgo off).
func needSim(t *testing.T) {
	t.Helper()
	tp, err := tpm.Open("sim")
	if errors.Is(err, tpm.ErrNotSupported) {
		testutil.Skip(t, "cgo", err.Error())
	}
	if err != nil {
		t.Fatalf("open TPM simulator: %v", err)
	}
	tp.Close()
}

// cancelOn is the demo's stdout; it cancels the demo once marker is
// printed, the way Ctrl-C would in the middle of the story.
type cancelOn struct {
	mu     sync.Mutex
	buf    bytes.Buffer
	marker string
	cancel context.CancelFunc
}

func (c *cancelOn) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.buf.Write(p)
	if c.marker != "" && strings.Contains(c.buf.String(), c.marker) {
		c.cancel()
	}
	return len(p), nil
}

// TestDemo runs `keygate demo` in-process: the whole story completes and
// tells each step, and an interrupted run still leaves nothing behind.
func TestDemo(t *testing.T) {
	needSim(t)
	tests := []struct {
		name    string
		args    []string // after "demo"
		cancel  string   // cancel once this is printed ("" = run to the end)
		wantErr string   // "" = success
		want    []string // in the output, in this order
		notWant string   // must not be in the output
	}{
		{name: "whole-story", want: []string{
			"==> 1. start the key service", "keysvc: VM API https://127.0.0.1:",
			"==> 2. enroll the VM", "learn mode",
			"==> 3. create a volume and unlock it through attestation", "unlocked in", "learned policy: PCRs",
			"==> 4. write and read files through the 9P server", `"Quarterly numbers`, "only ciphertext",
			"the key-page monitor (ebpfmon)",
			"a changed boot is refused", "PCR 15: allowed 0000000000000000…, got",
			"after a reboot into a changed boot", "PCR 7: allowed",
			"revoke the VM: the volume locks", "9P socket gone",
			"crypto-erase the volume", "erased: true", "a boot is refused (revoked",
			"audit:", "verify", "demo complete in",
		}},
		{name: "keep", args: []string{"--keep"}, cancel: "admin token: ", want: []string{"==> 1. start the key service",
			"crypto-erase the volume", "the key service keeps running", "dashboard:   https://127.0.0.1:", "admin token: "}},
		{name: "interrupted-while-serving", cancel: "==> 3.", wantErr: "demo interrupted", notWant: "==> 4."},
		{name: "interrupted-at-start", cancel: "keygate demo:", wantErr: "demo interrupted", notWant: "==> 1."},
		{name: "dir-not-empty", args: []string{"--dir", "full"}, wantErr: "is not empty", notWant: "keygate demo:"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			tmp := t.TempDir()
			t.Setenv("TMPDIR", tmp)
			args := []string{"demo"}
			for _, a := range tc.args {
				if a == "full" {
					// A directory with something in it: the demo must not touch it.
					a = filepath.Join(tmp, "full")
					if err := os.MkdirAll(a, 0o700); err != nil {
						t.Fatal(err)
					}
					if err := os.WriteFile(filepath.Join(a, "keep"), []byte("x"), 0o600); err != nil {
						t.Fatal(err)
					}
					defer func() {
						if _, err := os.Stat(filepath.Join(a, "keep")); err != nil {
							t.Errorf("the demo touched the non-empty --dir: %v", err)
						}
						os.RemoveAll(a)
					}()
				}
				args = append(args, a)
			}
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			out := &cancelOn{marker: tc.cancel, cancel: cancel}
			if slices.Contains(tc.args, "--keep") {
				// Log in to the kept service's dashboard before the Ctrl-C.
				var once sync.Once
				out.cancel = func() {
					once.Do(func() {
						go func() { out.mu.Lock(); s := out.buf.String(); out.mu.Unlock(); checkKeptDashboard(t, s); cancel() }()
					})
				}
			}
			var stderr bytes.Buffer
			root := newRoot()
			root.SetArgs(args)
			root.SetOut(out)
			root.SetErr(&stderr)
			err := root.ExecuteContext(ctx)
			got := out.buf.String()
			switch {
			case tc.wantErr == "" && err != nil:
				t.Fatalf("demo failed: %v\n%s%s", err, got, stderr.String())
			case tc.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tc.wantErr)):
				t.Fatalf("demo: error %v, want %q\n%s", err, tc.wantErr, got)
			}
			rest := got
			for _, w := range tc.want {
				i := strings.Index(rest, w)
				if i < 0 {
					t.Fatalf("output lacks %q (in order); output:\n%s", w, got)
				}
				rest = rest[i+len(w):]
			}
			if tc.notWant != "" && strings.Contains(got, tc.notWant) {
				t.Errorf("output has %q; output:\n%s", tc.notWant, got)
			}
			if tc.wantErr == "" {
				// As root the monitor shows an alert or says why it could not
				// start; otherwise the step says it needs root.
				monitor := []string{"skipped: watching who reads the key pages needs root"}
				if os.Geteuid() == 0 {
					monitor = []string{"raised: critical proc_mem", "skipped: it could not start here"}
				}
				if !slices.ContainsFunc(monitor, func(m string) bool { return strings.Contains(got, m) }) {
					t.Errorf("the monitor step says none of %q; output:\n%s", monitor, got)
				}
			}
			if slices.Contains(tc.args, "--dir") {
				return // the deferred check looks at --dir
			}
			left, err := os.ReadDir(tmp)
			if err != nil {
				t.Fatal(err)
			}
			if len(left) != 0 {
				t.Errorf("the demo left %v in %s", left, tmp)
			}
			// The simulator must be free again: the demo closed it.
			needSim(t)
		})
	}
}

// checkKeptDashboard logs in to the dashboard `demo --keep` printed, with
// the token it printed, and reads the fleet.
func checkKeptDashboard(t *testing.T, out string) {
	field := func(name string) string {
		_, v, ok := strings.Cut(out, "  "+name+":")
		if !ok {
			t.Errorf("demo --keep printed no %s", name)
			return ""
		}
		v, _, _ = strings.Cut(strings.TrimSpace(v), " ")
		v, _, _ = strings.Cut(v, "\n")
		return v
	}
	dash, caFile, token := field("dashboard"), field("CA"), field("admin token")
	ca, err := os.ReadFile(caFile)
	if err != nil {
		t.Errorf("CA %q: %v", caFile, err)
		return
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(ca)
	hc := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}},
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	defer hc.CloseIdleConnections()
	u, _ := url.Parse(dash)
	req, _ := http.NewRequest("POST", dash+"login", strings.NewReader(url.Values{"token": {token}}.Encode()))
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	req.Header.Set("Origin", "https://"+u.Host)
	resp, err := hc.Do(req)
	if err != nil || resp.StatusCode != http.StatusSeeOther || len(resp.Cookies()) == 0 {
		t.Errorf("log in to the kept dashboard %s: %v %v", dash, err, resp)
		return
	}
	resp.Body.Close()
	req, _ = http.NewRequest("GET", dash, nil)
	req.AddCookie(resp.Cookies()[0])
	resp, err = hc.Do(req)
	if err != nil {
		t.Error(err)
		return
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK || !strings.Contains(string(b), "demo-vm") || !strings.Contains(string(b), "revoked") {
		t.Errorf("the kept dashboard's fleet: %d, want demo-vm revoked:\n%s", resp.StatusCode, b)
	}
}
