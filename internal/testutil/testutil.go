// Package testutil holds helpers shared by keygate's tests: skips that turn
// into failures where the machine is supposed to have the feature, and
// globs that refuse to match nothing.
package testutil

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
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
