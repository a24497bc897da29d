package testutil

import (
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// StartSwtpm starts a real swtpm serving TPM 2.0 on a unix socket and
// returns the socket path and a stop function (also run in Cleanup). With
// state "" the TPM is fresh and its state is removed afterwards; otherwise
// the state directory is kept, so a later StartSwtpm(t, state) is the same
// TPM after a "reboot". Stop sends SIGINT so swtpm writes its state. It
// skips (or fails, see Skip) where swtpm is not installed.
func StartSwtpm(t testing.TB, state string) (sock string, stop func()) {
	t.Helper()
	bin := LookPath(t, "swtpm")
	// A unix socket path must stay short (108 bytes): t.TempDir can be long.
	dir, err := os.MkdirTemp("", "kgsw")
	if err != nil {
		t.Fatal(err)
	}
	if state == "" {
		state = dir
	}
	// tpm2-tools' swtpm TCTI finds the control socket at SOCKET.ctrl.
	sock = filepath.Join(dir, "s")
	cmd := exec.Command(bin, "socket", "--tpm2", "--server", "type=unixio,path="+sock,
		"--ctrl", "type=unixio,path="+sock+".ctrl", "--flags", "not-need-init,startup-clear", "--tpmstate", "dir="+state)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		os.RemoveAll(dir)
		t.Fatalf("start swtpm: %v", err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	stopped := false
	stop = func() {
		if stopped {
			return
		}
		stopped = true
		cmd.Process.Signal(os.Interrupt)
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			cmd.Process.Kill()
			<-done
		}
		os.RemoveAll(dir)
	}
	t.Cleanup(stop)
	for deadline := time.Now().Add(10 * time.Second); ; {
		if c, err := net.Dial("unix", sock); err == nil {
			c.Close() // swtpm serves one connection at a time; this one ends at once
			return sock, stop
		}
		select {
		case err := <-done:
			t.Fatalf("swtpm exited early: %v: %s", err, stderr.String())
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("swtpm did not create %s within 10s: %s", sock, stderr.String())
		}
	}
}
