package testutil

import (
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
)

// notRequired are the features a test may skip for even under make test,
// each with why no machine that runs make test can be asked to have it.
var notRequired = map[string]string{
	"tpm-device": "a real TPM (/dev/tpmrm0): the build and CI machines have none; tests use swtpm and the simulator",
	"io-flusher": "PR_SET_IO_FLUSHER needs CAP_SYS_RESOURCE, which the build sandbox withholds even from root; the test VM's guest has it",
}

// directSkips are the t.Skip calls that do not go through Skip, by file and
// message: each is an opt-in or -short skip that make test never takes, or
// a skip that is the absence of a problem.
var directSkips = map[string]string{
	"tpm/helpers_test.go: skipping: no real TPM named":                       "opt-in: -tpm or KEYGATE_TPM points the tests at real hardware",
	"tpm/helpers_test.go: skipping: extends PCRs of a real TPM":              "opt-in: KEYGATE_TPM_EXTEND=1",
	"ebpfmon/generate_test.go: skipping: regenerating the BPF objects":       "-short only",
	"testvm/internal_test.go: skipping the kernel fetch in -short mode":      "-short only",
	"testvm/internal_test.go: no ls to try a dynamic binary with":            "coreutils' ls is on every Debian machine",
	"testvm/vm_test.go: skipping guest boots in -short mode":                 "-short only",
	"disk/bench_test.go: no /proc/self/io":                                   "a benchmark, not run by make test",
	"disk/bench_test.go: no write_bytes in /proc/self/io":                    "a benchmark, not run by make test",
	"disk/nbd/attach_linux_test.go: this kernel has /dev/nbd0":               "the case is the kernel without NBD; the test VM attaches a real device",
	"disk/ninep/bench_test.go: no dd":                                        "a benchmark, not run by make test",
	"disk/ninep/differential_test.go: runs only as TestDifferential's child": "the child half of TestDifferential, which runs it",
	"keysvc/flood_test.go: sends 10,000 requests":                            "-short only",
	"keysvc/masterkey/seal_test.go: set KEYGATE_WRITE_FUZZ_SEEDS=1":          "opt-in: regenerates the seed corpus",
	"attest/fuzz_test.go: skipping: set KEYGATE_WRITE_SEEDS=1 to regenerate": "opt-in: regenerates testdata",
}

var (
	reSkip     = regexp.MustCompile(`testutil\.(?:Skip|LookPath)\(\w+, "([^"]+)"`)
	reLocal    = regexp.MustCompile(`(?:^|[^.\w])(?:Skip|LookPath)\(\w+, "([^"]+)"`)
	reRoot     = regexp.MustCompile(`testutil\.Root\(`)
	reSwtpm    = regexp.MustCompile(`testutil\.StartSwtpm\(`)
	rePG       = regexp.MustCompile(`pgtest\.(?:New|Shared)\(`)
	reDirect   = regexp.MustCompile(`\b\w+\.Skipf?\(\s*"([^"]*)"`)
	reRequired = regexp.MustCompile(`(?m)^export KEYGATE_REQUIRE \?= (\S+)$`)
)

// TestEverySkipIsRequired lists every reason a test in the tree can skip
// and checks it against make test's KEYGATE_REQUIRE: a feature missing
// there would let a test pass by skipping on a machine that should have
// run it. Direct t.Skip calls must be one of the known opt-in or -short
// cases.
func TestEverySkipIsRequired(t *testing.T) {
	root := moduleRoot(t)
	mk, err := os.ReadFile(filepath.Join(root, "Makefile"))
	if err != nil {
		t.Fatal(err)
	}
	m := reRequired.FindSubmatch(mk)
	if m == nil {
		t.Fatal("no `export KEYGATE_REQUIRE ?= ...` line in the Makefile")
	}
	required := strings.Split(string(m[1]), ",")

	features := map[string][]string{} // feature -> files that skip for it
	var direct []string
	err = filepath.WalkDir(root, func(p string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() && (strings.HasPrefix(d.Name(), ".") || d.Name() == "testdata") && p != root {
			return filepath.SkipDir
		}
		if !strings.HasSuffix(p, "_test.go") || strings.HasSuffix(p, "skips_test.go") {
			return nil
		}
		src, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, p)
		re := reSkip
		if filepath.Dir(rel) == "internal/testutil" {
			re = reLocal
		}
		for _, m := range re.FindAllSubmatch(src, -1) {
			features[string(m[1])] = append(features[string(m[1])], rel)
		}
		if reRoot.Match(src) {
			features["root"] = append(features["root"], rel)
		}
		if reSwtpm.Match(src) {
			features["swtpm"] = append(features["swtpm"], rel)
		}
		if rePG.Match(src) {
			features["postgresql"] = append(features["postgresql"], rel)
		}
		for _, m := range reDirect.FindAllSubmatch(src, -1) {
			direct = append(direct, rel+": "+string(m[1]))
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(features) < 10 {
		t.Fatalf("found only %d skip features: the scan is broken", len(features))
	}
	for f, files := range features {
		if slices.Contains(required, f) {
			continue
		}
		if why, ok := notRequired[f]; ok {
			t.Logf("%s may skip under make test: %s", f, why)
			continue
		}
		t.Errorf("tests in %v skip for %q, which KEYGATE_REQUIRE in the Makefile does not name: add it there (and its package to TEST_DEBS), or to notRequired with the reason", slices.Compact(files), f)
	}
	for _, d := range direct {
		known := false
		for k := range directSkips {
			if strings.HasPrefix(d, k) {
				known = true
			}
		}
		if !known {
			t.Errorf("direct skip %q: use testutil.Skip with a feature name, or add it to directSkips with why make test never takes it", d)
		}
	}
}

func moduleRoot(t *testing.T) string {
	t.Helper()
	dir, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			t.Fatal("no go.mod above the test's directory")
		}
		dir = parent
	}
}
