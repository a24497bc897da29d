package boot

import (
	"context"
	"errors"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/keygate/keygate/internal/testutil"
)

// TestServeNBD runs keygate boot with the block export and drives it with
// real NBD clients: what qemu-io writes reads back, through another
// connection, and a revoke or erase takes the export down.
func TestServeNBD(t *testing.T) {
	e := startEnv(t)
	qemuIO := testutil.LookPath(t, "qemu-io")
	io := func(t *testing.T, sock, cmd string) (string, error) {
		out, err := exec.Command(qemuIO, "-f", "raw", "-c", cmd, "nbd+unix:///?socket="+sock).CombinedOutput()
		if err == nil && strings.Contains(string(out), "fail") {
			err = errors.New("qemu-io reported a failure")
		}
		return string(out), err
	}
	tests := []struct {
		name string
		act  func(t *testing.T, b *Boot, ev *events, vm, vol string)
	}{
		{"read-write", func(t *testing.T, b *Boot, ev *events, vm, vol string) {
			if b.FS() != nil {
				t.Fatal("go-diskfs opened the filesystem of a volume the kernel is to own")
			}
			for _, cmd := range []string{"write -P 0x5a 1M 256k", "flush", "read -P 0x5a 1M 256k", "write -P 0x11 1000 10", "read -P 0x11 1000 10"} {
				if out, err := io(t, b.NBDSocket(), cmd); err != nil {
					t.Fatalf("qemu-io %q: %v\n%s", cmd, err, out)
				}
			}
			fi, err := os.Lstat(b.NBDSocket())
			if err != nil || fi.Mode().Perm() != 0o600 {
				t.Fatalf("NBD socket mode %v (%v), want 0600", fi.Mode(), err)
			}
		}},
		{"revoke-locks", func(t *testing.T, b *Boot, ev *events, vm, vol string) {
			e.admin(t, "POST", "/v1/admin/vms/"+vm+"/revoke", nil, http.StatusOK)
			wantNBDLocked(t, b, ev)
		}},
		{"erase-locks", func(t *testing.T, b *Boot, ev *events, vm, vol string) {
			e.admin(t, "POST", "/v1/admin/volumes/"+vol+"/erase", nil, http.StatusOK)
			wantNBDLocked(t, b, ev)
		}},
	}
	for i, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			vm := "nbd" + string(rune('a'+i))
			b, ev := e.serveNBD(t, vm)
			defer b.Close()
			tc.act(t, b, ev, vm, vm+"-vol")
		})
	}
}

// serveNBD enrolls vm with a fresh volume, vm-vol, and runs a boot that
// serves it over NBD, returning once it serves. The caller closes it.
func (e *env) serveNBD(t *testing.T, vm string) (*Boot, *events) {
	t.Helper()
	tp := openSim(t)
	e.enroll(t, tp, vm, false)
	img := e.volume(t, vm, vm+"-vol")
	ev := newEvents()
	c := e.cfg(tp, vm, img, ev)
	c.ServeNBD = filepath.Join(filepath.Dir(socketPath(t)), "nbd")
	b, err := Run(context.Background(), c)
	if err != nil {
		t.Fatalf("run: %v", err)
	}
	ev.wait(t, EventServing)
	return b, ev
}

func wantNBDLocked(t *testing.T, b *Boot, ev *events) {
	t.Helper()
	l := ev.wait(t, EventLocked)
	if !errors.Is(l.Err, ErrRevoked) {
		t.Fatalf("lock reason %v, want ErrRevoked", l.Err)
	}
	if _, err := os.Lstat(b.NBDSocket()); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("NBD socket still there after the lock: %v", err)
	}
	if _, err := net.Dial("unix", b.NBDSocket()); err == nil {
		t.Fatal("NBD still answers after the lock")
	}
}

// TestTwoExportsRefused: 9P and NBD at once is refused before anything
// is asked of the TPM or the key service.
func TestTwoExportsRefused(t *testing.T) {
	for _, tc := range []struct {
		name string
		cfg  func(*Config)
	}{
		{"9p and nbd socket", func(c *Config) { c.Serve9P, c.ServeNBD = "/tmp/a", "/tmp/b" }},
		{"9p and attach", func(c *Config) { c.Serve9P, c.Attach = "/tmp/a", "/dev/nbd0" }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := Config{VM: "vm", Image: "/nonexistent", TPMSpec: "/nonexistent", Log: quietLog()}
			tc.cfg(&c)
			_, err := Run(context.Background(), c)
			if !errors.Is(err, ErrTwoExports) {
				t.Fatalf("Run: %v, want ErrTwoExports", err)
			}
		})
	}
}
