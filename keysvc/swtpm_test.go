package keysvc_test

import (
	"errors"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/keygate/keygate/internal/testutil"
	"github.com/keygate/keygate/keysvc"
	"github.com/keygate/keygate/tpm"
)

// startSwtpm starts a swtpm with fresh state (so a different EK from the
// simulator's) and opens it; everything is stopped in Cleanup.
func startSwtpm(t *testing.T) *tpm.TPM {
	t.Helper()
	bin := testutil.LookPath(t, "swtpm")
	dir, err := os.MkdirTemp("", "kssw") // a unix socket path must stay short
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	sock := filepath.Join(dir, "s")
	cmd := exec.Command(bin, "socket", "--tpm2", "--server", "type=unixio,path="+sock,
		"--ctrl", "type=unixio,path="+sock+".ctrl", "--flags", "not-need-init,startup-clear", "--tpmstate", "dir="+dir)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatalf("start swtpm: %v", err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	t.Cleanup(func() { cmd.Process.Kill(); <-done })
	for deadline := time.Now().Add(10 * time.Second); ; {
		if c, err := net.Dial("unix", sock); err == nil {
			c.Close()
			break
		}
		select {
		case err := <-done:
			t.Fatalf("swtpm exited early: %v: %s", err, stderr.String())
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("swtpm did not start within 10s: %s", stderr.String())
		}
	}
	tp, err := tpm.Open("swtpm:" + sock)
	if err != nil {
		t.Fatalf("open swtpm: %v", err)
	}
	t.Cleanup(func() { tp.Close() })
	return tp
}

// TestStolenBlob: a blob released to the VM (the simulator) does not import
// on another TPM (a swtpm), and that TPM cannot get a challenge in the VM's
// name either.
func TestStolenBlob(t *testing.T) {
	e := startEnv(t, t.TempDir())
	v := openVM(t)
	vol := setup(t, e, v, "victim")
	code, body := e.unlock(t, v, "victim", vol)
	if code != http.StatusOK {
		t.Fatalf("unlock: %d %s", code, body)
	}
	thief := &vmTPM{tpm: startSwtpm(t)}
	if _, err := thief.importBlob(t, body, tpm.ECC); !errors.Is(err, tpm.ErrWrongTPM) {
		t.Fatalf("import on another TPM: %v, want ErrWrongTPM", err)
	}
	ek, err := thief.tpm.EK(tpm.ECC)
	if err != nil {
		t.Fatal(err)
	}
	ekPEM, _ := ek.PEM()
	code, body = e.vm(t, "POST", "/v1/challenge", keysvc.ChallengeRequest{VM: "victim", Volume: vol, EKPub: string(ekPEM), AKPub: v.akPEM})
	wantRefusal(t, code, body, keysvc.ReasonUnknownEK)
}
