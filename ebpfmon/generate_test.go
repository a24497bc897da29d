package ebpfmon_test

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/keygate/keygate/internal/testutil"
)

// TestGeneratedFresh rebuilds the BPF objects from bpf/*.c with the
// //go:generate lines of gen.go, into a temporary directory, and checks
// that the committed *_bpfel.{go,o} are byte for byte what they give.
func TestGeneratedFresh(t *testing.T) {
	if testing.Short() {
		t.Skip("skipping: regenerating the BPF objects takes seconds (-short)")
	}
	goBin := testutil.LookPath(t, "go")
	testutil.LookPath(t, "clang")
	testutil.LookPath(t, "llvm-strip")
	src, err := os.ReadFile("gen.go")
	if err != nil {
		t.Fatal(err)
	}
	out := t.TempDir()
	n := 0
	for _, line := range strings.Split(string(src), "\n") {
		cmdline, ok := strings.CutPrefix(line, "//go:generate go run ")
		if !ok {
			continue
		}
		args := append([]string{"run"}, splitQuoted(t, cmdline)...)
		// bpf2go's flags end at its ident; -output-dir goes before that.
		pkgIdx := 1
		args = append(args[:pkgIdx+1], append([]string{"-output-dir", out}, args[pkgIdx+1:]...)...)
		cmd := exec.Command(goBin, args...)
		cmd.Env = append(os.Environ(), "GOPACKAGE=ebpfmon")
		if b, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("go %s: %v\n%s", strings.Join(args, " "), err, b)
		}
		n++
	}
	if n == 0 {
		t.Fatal("gen.go has no //go:generate lines")
	}
	for _, f := range testutil.Glob(t, filepath.Join(out, "*_bpfel.*")) {
		want, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		got, err := os.ReadFile(filepath.Base(f))
		if err != nil {
			t.Fatalf("%s is generated but not committed: %v (run make generate)", filepath.Base(f), err)
		}
		if !bytes.Equal(got, want) {
			t.Errorf("%s is stale: it differs from what bpf/*.c give now (run make generate and commit the result)", filepath.Base(f))
		}
	}
}

// splitQuoted splits a go:generate line the way go generate does: on
// spaces, with double-quoted strings kept whole.
func splitQuoted(t *testing.T, s string) []string {
	var out []string
	for s = strings.TrimSpace(s); s != ""; s = strings.TrimSpace(s) {
		if s[0] == '"' {
			end := strings.IndexByte(s[1:], '"')
			if end < 0 {
				t.Fatalf("unterminated quote in %q", s)
			}
			out = append(out, s[1:end+1])
			s = s[end+2:]
			continue
		}
		f, rest, _ := strings.Cut(s, " ")
		out = append(out, f)
		s = rest
	}
	return out
}
