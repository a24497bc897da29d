package main

import (
	"bufio"
	"io"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/keygate/keygate/keysvc"
)

// serveOnce runs `keysvc serve` in-process on random ports, with extra
// flags, until it has printed its addresses, stops it with SIGTERM, and
// returns what it printed.
func serveOnce(t *testing.T, data string, extra ...string) string {
	t.Helper()
	pr, pw := io.Pipe()
	done := make(chan int, 1)
	var errb strings.Builder
	go func() {
		args := []string{"serve", "--data", data, "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--log-format", "json"}
		done <- run(append(args, extra...), nil, pw, &errb)
		pw.Close()
	}()
	var out strings.Builder
	sc := bufio.NewScanner(pr)
	for sc.Scan() {
		out.WriteString(sc.Text() + "\n")
		if strings.Contains(sc.Text(), "master key:") {
			break
		}
	}
	if !strings.Contains(out.String(), "master key:") {
		t.Fatalf("serve printed %q; stderr %s", out.String(), errb.String())
	}
	// The signal handler is installed before Start, and Start before the
	// addresses are printed: the signal reaches serve, not the test binary.
	syscall.Kill(os.Getpid(), syscall.SIGTERM)
	copied := make(chan struct{})
	go func() { io.Copy(&out, pr); close(copied) }()
	select {
	case code := <-done:
		if code != 0 {
			t.Fatalf("serve exited %d: %s", code, errb.String())
		}
	case <-time.After(20 * time.Second):
		t.Fatal("serve did not stop on SIGTERM")
	}
	<-copied
	if !strings.HasSuffix(out.String(), "keysvc stopped\n") {
		t.Fatalf("serve did not report a graceful stop: %s", out.String())
	}
	return out.String()
}

func TestServeCreatesThenReuses(t *testing.T) {
	data := filepath.Join(t.TempDir(), "data")
	first := serveOnce(t, data)
	if !strings.Contains(first, "created now:") || !strings.Contains(first, filepath.Join(data, keysvc.CAFile)) {
		t.Fatalf("first start did not say what it created: %s", first)
	}
	tok, err := os.ReadFile(filepath.Join(data, keysvc.AdminTokenFile))
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(first, strings.TrimSpace(string(tok))) {
		t.Fatal("serve printed the admin token")
	}
	second := serveOnce(t, data)
	if strings.Contains(second, "created now:") {
		t.Fatalf("second start created files: %s", second)
	}
}
