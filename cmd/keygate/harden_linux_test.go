package main

import (
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/keygate/keygate/internal/testutil"
)

// TestDiskServeUndumpable: keygate disk serve holds the volume's keys for
// as long as it serves, so it makes itself undumpable before reading the
// key file: another process of its user cannot read /proc/PID/mem or
// ptrace it, and a crash writes no core. Both run as nobody here, since
// the owner of /proc/PID/mem then tells: root for an undumpable process,
// the process's own user for any other (the sleep, which shows the check
// can fail).
func TestDiskServeUndumpable(t *testing.T) {
	testutil.Root(t)
	setpriv := testutil.LookPath(t, "setpriv")
	// nobody must reach the binary, the image and the key: a directory of
	// its own under /tmp, not the test's 0700 temp dirs
	dir, err := os.MkdirTemp("", "kgharden")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	run := filepath.Join(dir, "run")
	for _, err := range []error{os.Chmod(dir, 0o755), os.Mkdir(run, 0o700), os.Chown(run, 65534, 65534)} {
		if err != nil {
			t.Fatal(err)
		}
	}
	kg := filepath.Join(dir, "keygate") // testscript.Main runs main for this name
	copyFile(t, os.Args[0], kg, 0o755)
	key, img := filepath.Join(dir, "k"), filepath.Join(dir, "v.img")
	if err := os.WriteFile(key, []byte("undumpable-test-key"), 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command(kg, "disk", "create", img, "--size", "20M", "--key-file", key, "--pbkdf", "pbkdf2").CombinedOutput(); err != nil {
		t.Fatalf("disk create: %v\n%s", err, out)
	}
	if err := os.Chmod(img, 0o644); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(run, "s")
	for _, tc := range []struct {
		name       string
		args       []string
		undumpable bool
	}{
		{"keygate disk serve", []string{kg, "disk", "serve", img, "--key-file", key, "--nbd", sock, "--read-only"}, true},
		{"sleep", []string{testutil.LookPath(t, "sleep"), "60"}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cmd := exec.Command(setpriv, append([]string{"--reuid=65534", "--regid=65534", "--clear-groups", "--"}, tc.args...)...)
			var out strings.Builder
			cmd.Stdout, cmd.Stderr = &out, &out
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			done, exited := make(chan string, 1), make(chan struct{})
			go func() {
				cmd.Wait()
				close(exited)
				done <- out.String() // whole once the process is gone
			}()
			t.Cleanup(func() {
				cmd.Process.Signal(syscall.SIGINT)
				<-exited
			})
			if tc.undumpable {
				waitSocket(t, sock, done)
			}
			proc := filepath.Join("/proc", strconv.Itoa(cmd.Process.Pid))
			// setpriv changes its user and then execs the program, which
			// sets dumpable afresh: look once the program runs
			name := filepath.Base(tc.args[0])
			for deadline := time.Now().Add(60 * time.Second); ; time.Sleep(10 * time.Millisecond) {
				status, err := os.ReadFile(filepath.Join(proc, "status"))
				if err != nil {
					t.Fatal(err)
				}
				if strings.HasPrefix(string(status), "Name:\t"+name+"\n") && strings.Contains(string(status), "\nUid:\t65534\t") {
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("%s does not run as nobody:\n%s", name, status)
				}
			}
			var st syscall.Stat_t
			if err := syscall.Stat(filepath.Join(proc, "mem"), &st); err != nil {
				t.Fatal(err)
			}
			if got := st.Uid == 0; got != tc.undumpable {
				t.Errorf("/proc/PID/mem of %s is owned by uid %d: undumpable %v, want %v", tc.name, st.Uid, got, tc.undumpable)
			}
			limits, err := os.ReadFile(filepath.Join(proc, "limits"))
			if err != nil {
				t.Fatal(err)
			}
			noCore := strings.Contains(strings.Join(strings.Fields(string(limits)), " "), "Max core file size 0 0 bytes")
			if tc.undumpable && !noCore {
				t.Errorf("%s may still write a core file:\n%s", tc.name, limits)
			}
		})
	}
}

func copyFile(t *testing.T, from, to string, mode os.FileMode) {
	t.Helper()
	src, err := os.Open(from)
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	dst, err := os.OpenFile(to, os.O_WRONLY|os.O_CREATE|os.O_EXCL, mode)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(dst, src); err != nil {
		t.Fatal(err)
	}
	if err := dst.Close(); err != nil {
		t.Fatal(err)
	}
}
