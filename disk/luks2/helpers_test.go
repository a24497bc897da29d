package luks2_test

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/awnumar/memguard"
	"github.com/keygate/keygate/disk/luks2"
	"github.com/keygate/keygate/internal/testutil"
)

// Cheap KDF settings keep the whole package well under a minute.
var (
	cheapPBKDF2   = luks2.PBKDF{Type: "pbkdf2", Hash: "sha256", Iterations: 1000}
	cheapArgon2id = luks2.PBKDF{Type: "argon2id", Time: 4, MemoryKiB: 32768, Parallel: 1}
)

// csArgs are the cryptsetup options giving the same cheap KDFs.
func csArgs(p luks2.PBKDF) []string {
	if p.Type == "pbkdf2" {
		return []string{"--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"}
	}
	return []string{"--pbkdf", "argon2id", "--pbkdf-force-iterations", "4", "--pbkdf-memory", "32768", "--pbkdf-parallel", "1"}
}

const imageSize = 20 << 20

// newImage creates a sparse image file of size bytes.
func newImage(t testing.TB, size int64) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "vol.img")
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	f.Close()
	return p
}

func writeKeyFile(t testing.TB, b []byte) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "key")
	if err := os.WriteFile(p, b, 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func openRW(t testing.TB, p string) *os.File {
	t.Helper()
	f, err := os.OpenFile(p, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

// format makes a keygate volume at a new image and returns its path and
// volume key bytes.
func format(t testing.TB, pass []byte, opts luks2.FormatOptions) (string, []byte) {
	t.Helper()
	p := newImage(t, imageSize)
	if opts.PBKDF == (luks2.PBKDF{}) {
		opts.PBKDF = cheapPBKDF2
	}
	if opts.DigestIterations == 0 {
		opts.DigestIterations = 1000
	}
	_, vk, err := luks2.Format(openRW(t, p), pass, opts)
	if err != nil {
		t.Fatalf("Format: %v", err)
	}
	defer vk.Destroy()
	return p, bytes.Clone(vk.Bytes())
}

func fileHash(t testing.TB, p string) string {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

// cryptsetup runs cryptsetup and returns its stdout, failing on error.
func cryptsetup(t testing.TB, args ...string) string {
	t.Helper()
	out, err := cryptsetupErr(t, args...)
	if err != nil {
		t.Fatalf("cryptsetup %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return out
}

func cryptsetupErr(t testing.TB, args ...string) (string, error) {
	t.Helper()
	bin := testutil.LookPath(t, "cryptsetup")
	var stdout, stderr bytes.Buffer
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	return stdout.String() + stderr.String(), err
}

// dumpVolumeKey returns the key `cryptsetup luksDump --dump-volume-key`
// prints.
func dumpVolumeKey(t testing.TB, img, keyFile string) []byte {
	t.Helper()
	out := cryptsetup(t, "luksDump", "--dump-volume-key", "--key-file", keyFile, "--batch-mode", img)
	i := strings.Index(out, "MK dump:")
	if i < 0 {
		t.Fatalf("no MK dump in:\n%s", out)
	}
	hexText := strings.Join(strings.Fields(out[i+len("MK dump:"):]), "")
	vk, err := hex.DecodeString(hexText)
	if err != nil {
		t.Fatalf("parse MK dump: %v", err)
	}
	return vk
}

func unlock(t testing.TB, v *luks2.Volume, pass []byte) ([]byte, int) {
	t.Helper()
	vk, slot, err := v.Unlock(pass)
	if err != nil {
		t.Fatalf("Unlock: %v", err)
	}
	defer vk.Destroy()
	return bytes.Clone(vk.Bytes()), slot
}

func lockedKey(b []byte) *memguard.LockedBuffer {
	return memguard.NewBufferFromBytes(bytes.Clone(b))
}

func mustJSON(t testing.TB, v any) []byte {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestMain fails the run if an example leaves its image file behind.
func TestMain(m *testing.M) {
	code := m.Run()
	if left, _ := filepath.Glob(filepath.Join(os.TempDir(), "luks2-example-*.img")); len(left) > 0 && code == 0 {
		fmt.Fprintf(os.Stderr, "leaked temp files: %v\n", left)
		code = 1
	}
	os.Exit(code)
}
