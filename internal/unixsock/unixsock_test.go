package unixsock_test

import (
	"errors"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/keygate/keygate/internal/testutil"
	"github.com/keygate/keygate/internal/unixsock"
)

func TestListen(t *testing.T) {
	for _, tc := range []struct {
		name    string
		prepare func(t *testing.T, path string)
		wantErr bool
	}{
		{name: "new path"},
		{name: "stale socket is replaced", prepare: func(t *testing.T, path string) {
			l, err := net.Listen("unix", path)
			if err != nil {
				t.Fatal(err)
			}
			l.(*net.UnixListener).SetUnlinkOnClose(false)
			l.Close()
		}},
		{name: "live socket is refused", wantErr: true, prepare: func(t *testing.T, path string) {
			l, err := net.Listen("unix", path)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { l.Close() })
			go func() {
				for {
					c, err := l.Accept()
					if err != nil {
						return
					}
					c.Close()
				}
			}()
		}},
		{name: "regular file is refused", wantErr: true, prepare: func(t *testing.T, path string) {
			if err := os.WriteFile(path, []byte("data"), 0o600); err != nil {
				t.Fatal(err)
			}
		}},
		{name: "missing directory is refused", wantErr: true, prepare: func(t *testing.T, path string) {
			os.Remove(filepath.Dir(path))
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := testutil.ShortTempDir(t)
			path := filepath.Join(dir, "s")
			if tc.prepare != nil {
				tc.prepare(t, path)
			}
			l, err := unixsock.Listen(path)
			if tc.wantErr {
				if err == nil {
					l.Close()
					t.Fatal("Listen succeeded")
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			fi, err := os.Lstat(path)
			if err != nil {
				t.Fatal(err)
			}
			if fi.Mode()&os.ModeSocket == 0 || fi.Mode().Perm() != 0o600 {
				t.Fatalf("socket mode %v, want a 0600 socket", fi.Mode())
			}
			if ents, _ := os.ReadDir(dir); len(ents) != 1 {
				t.Fatalf("the directory holds %d entries; the private staging directory was left behind", len(ents))
			}
			go func() {
				if c, err := net.Dial("unix", path); err == nil {
					c.Write([]byte("x"))
					c.Close()
				}
			}()
			c, err := l.Accept()
			if err != nil {
				t.Fatal(err)
			}
			c.Close()
			l.Close()
			if _, err := os.Lstat(path); !errors.Is(err, os.ErrNotExist) {
				t.Fatalf("socket still there after Close: %v", err)
			}
		})
	}
}

// TestPeerUID: a peer whose uid is not allowed is closed at once even when
// the socket's mode lets it connect; an allowed one is accepted.
func TestPeerUID(t *testing.T) {
	if os.Getenv("UNIXSOCK_DIAL") != "" {
		c, err := net.Dial("unix", os.Getenv("UNIXSOCK_DIAL"))
		if err != nil {
			os.Exit(2)
		}
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		var b [1]byte
		if _, err := c.Read(b[:]); err != nil {
			os.Exit(3) // closed by the server
		}
		os.Exit(0)
	}
	testutil.Root(t)
	const nobody = testutil.Nobody
	for _, tc := range []struct {
		name     string
		allow    []uint32
		accepted bool
	}{
		{"not allowed (mode loosened by hand)", nil, false},
		{"allowed with --allow-uid", []uint32{nobody}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := testutil.ShortTempDir(t)
			os.Chmod(dir, 0o755)
			path := filepath.Join(dir, "s")
			l, err := unixsock.Listen(path, tc.allow...)
			if err != nil {
				t.Fatal(err)
			}
			defer l.Close()
			refused := make(chan int64, 1)
			l.OnRefused = func(uid int64, err error) { refused <- uid }
			if !tc.accepted {
				// Only the peer check can refuse it now: loosen the mode
				// as an operator might.
				os.Chmod(path, 0o666)
			}
			go func() {
				if c, err := l.Accept(); err == nil {
					c.Write([]byte("y"))
					c.Close()
				}
			}()
			cmd := testutil.NobodyCommand(t, "^TestPeerUID$")
			cmd.Env = append(os.Environ(), "UNIXSOCK_DIAL="+path)
			err = cmd.Run()
			code := 0
			if ee, ok := err.(*exec.ExitError); ok {
				code = ee.ExitCode()
			} else if err != nil {
				t.Fatal(err)
			}
			if tc.accepted && code != 0 {
				t.Fatalf("allowed peer: exit %d, want accepted", code)
			}
			if !tc.accepted {
				if code != 3 {
					t.Fatalf("peer uid %d: exit %d, want closed by the server (3)", nobody, code)
				}
				if uid := <-refused; uid != nobody {
					t.Fatalf("OnRefused got uid %s", strconv.FormatInt(uid, 10))
				}
			}
		})
	}
}
