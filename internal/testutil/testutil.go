// Package testutil holds helpers shared by keygate's tests: skips that turn
// into failures where the machine is supposed to have the feature, and
// globs that refuse to match nothing.
package testutil

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// required reports whether KEYGATE_REQUIRE (a comma-separated list, or
// "all") names feature. `make test` sets it, so that a missing tool fails
// the run instead of silently skipping.
func required(feature string) bool {
	for _, f := range strings.Split(os.Getenv("KEYGATE_REQUIRE"), ",") {
		if f = strings.TrimSpace(f); f == feature || f == "all" {
			return true
		}
	}
	return false
}

// Skip skips the test with reason, unless KEYGATE_REQUIRE names feature, in
// which case the machine should have had it and the test fails.
func Skip(t testing.TB, feature, reason string) {
	t.Helper()
	if required(feature) {
		t.Fatalf("%s is required here (KEYGATE_REQUIRE) but unavailable: %s", feature, reason)
	}
	t.Skipf("skipping: %s unavailable: %s", feature, reason)
}

// LookPath returns the path of the named program, or skips (or fails, see
// Skip) when it is not installed.
func LookPath(t testing.TB, prog string) string {
	t.Helper()
	p, err := exec.LookPath(prog)
	if err != nil {
		Skip(t, prog, prog+" is not installed (make test installs it with apt-get)")
	}
	return p
}

// Root skips (or fails, see Skip) unless the test runs as root.
func Root(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		Skip(t, "root", "test needs root")
	}
}

// Glob is filepath.Glob that fails the test when the pattern matches
// nothing, so that a corpus of vectors cannot silently become empty.
func Glob(t testing.TB, pattern string) []string {
	t.Helper()
	m, err := filepath.Glob(pattern)
	if err != nil {
		t.Fatalf("glob %s: %v", pattern, err)
	}
	if len(m) == 0 {
		t.Fatalf("glob %s matched no files", pattern)
	}
	return m
}

// ShortTempDir is a temporary directory removed at the end of the test,
// with a short path: a unix socket's path must fit in 108 bytes, and
// t.TempDir's may not.
func ShortTempDir(t testing.TB) string {
	t.Helper()
	d, err := os.MkdirTemp("", "kg")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

// Nobody is the uid and gid NobodyCommand runs as.
const Nobody = 65534

// NobodyCommand returns a command that runs this test binary, with
// -test.run=run, as the unprivileged user nobody, through wrapper (a
// command and its arguments, such as prlimit, or none). The binary is
// copied into a fresh 0755 directory first: the one go test builds it in
// is private to root. It skips (or fails, see Skip) unless the test runs
// as root.
func NobodyCommand(t testing.TB, run string, wrapper ...string) *exec.Cmd {
	t.Helper()
	Root(t)
	dir := ShortTempDir(t)
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	self, err := os.ReadFile(os.Args[0])
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(dir, "test")
	if err := os.WriteFile(bin, self, 0o755); err != nil {
		t.Fatal(err)
	}
	args := append(append([]string{}, wrapper...), bin, "-test.run="+run)
	cmd := exec.Command(args[0], args[1:]...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: Nobody, Gid: Nobody}}
	return cmd
}
