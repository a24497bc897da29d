package masterkey_test

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/keygate/keygate/keysvc/masterkey"
)

// fixedKey loads a master key with fixed bytes, so that sealed seeds in
// testdata stay valid.
func fixedKey(t testing.TB) *masterkey.Key {
	t.Helper()
	path := filepath.Join(t.TempDir(), "master.key")
	if err := os.WriteFile(path, bytes.Repeat([]byte{0x42}, masterkey.Size), 0o600); err != nil {
		t.Fatal(err)
	}
	k, _, err := masterkey.LoadOrCreate(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(k.Destroy)
	return k
}

func TestSealOpen(t *testing.T) {
	k := fixedKey(t)
	secret := []byte("unwrap-key-0123456789abcdef01234")
	sealed, err := k.Seal("vol-1", secret)
	if err != nil {
		t.Fatal(err)
	}
	if len(sealed) != len(secret)+masterkey.SealOverhead {
		t.Errorf("sealed length %d, want %d", len(sealed), len(secret)+masterkey.SealOverhead)
	}
	if bytes.Contains(sealed, secret[:8]) {
		t.Error("sealed blob contains plaintext")
	}
	again, _ := k.Seal("vol-1", secret)
	if bytes.Equal(sealed, again) {
		t.Error("two seals of the same plaintext are equal (nonce reuse)")
	}
	buf, err := k.Open("vol-1", sealed)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(buf.Bytes(), secret) {
		t.Error("round trip changed the plaintext")
	}
	buf.Destroy()

	other, _, err := masterkey.LoadOrCreate(filepath.Join(t.TempDir(), "other.key"))
	if err != nil {
		t.Fatal(err)
	}
	defer other.Destroy()

	flip := func(i int) []byte {
		b := bytes.Clone(sealed)
		b[i] ^= 1
		return b
	}
	tests := []struct {
		name   string
		key    *masterkey.Key
		id     string
		sealed []byte
	}{
		{"wrong record ID", k, "vol-2", sealed},
		{"record ID prefix", k, "vol-", sealed},
		{"wrong master key", other, "vol-1", sealed},
		{"flipped version", k, "vol-1", flip(0)},
		{"flipped nonce", k, "vol-1", flip(1)},
		{"flipped ciphertext", k, "vol-1", flip(20)},
		{"flipped tag", k, "vol-1", flip(len(sealed) - 1)},
		{"truncated", k, "vol-1", sealed[:len(sealed)-1]},
		{"only overhead", k, "vol-1", sealed[:masterkey.SealOverhead]},
		{"empty", k, "vol-1", nil},
		{"extended", k, "vol-1", append(bytes.Clone(sealed), 0)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			buf, err := tt.key.Open(tt.id, tt.sealed)
			if err == nil {
				buf.Destroy()
				t.Fatal("Open accepted the blob")
			}
			if !errors.Is(err, masterkey.ErrOpen) {
				t.Errorf("error %v, want ErrOpen", err)
			}
			if strings.Contains(err.Error(), string(secret[:8])) {
				t.Errorf("error %q leaks plaintext", err)
			}
		})
	}

	for _, tt := range []struct {
		name, id string
		pt       []byte
	}{{"empty record ID", "", secret}, {"empty plaintext", "vol-1", nil}} {
		t.Run("seal "+tt.name, func(t *testing.T) {
			if _, err := k.Seal(tt.id, tt.pt); err == nil {
				t.Error("Seal accepted it")
			}
		})
	}
}

// TestWriteFuzzSeeds regenerates testdata/fuzz/FuzzOpenSealed/valid when
// KEYGATE_WRITE_FUZZ_SEEDS=1 (the blob is random, so it is written once and
// committed).
func TestWriteFuzzSeeds(t *testing.T) {
	if os.Getenv("KEYGATE_WRITE_FUZZ_SEEDS") != "1" {
		t.Skip("set KEYGATE_WRITE_FUZZ_SEEDS=1 to regenerate the seed corpus")
	}
	sealed, err := fixedKey(t).Seal("vol-1", []byte("fuzz seed plaintext"))
	if err != nil {
		t.Fatal(err)
	}
	seed := fmt.Sprintf("go test fuzz v1\nstring(%q)\n[]byte(%q)\n", "vol-1", sealed)
	if err := os.WriteFile(filepath.Join("testdata", "fuzz", "FuzzOpenSealed", "valid"), []byte(seed), 0o644); err != nil {
		t.Fatal(err)
	}
}

// readSeed parses a two-value (string, []byte) corpus file.
func readSeed(t testing.TB, path string) (string, []byte) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	if len(lines) != 3 || lines[0] != "go test fuzz v1" {
		t.Fatalf("%s: not a (string, []byte) corpus file", path)
	}
	id, err1 := strconv.Unquote(strings.TrimSuffix(strings.TrimPrefix(lines[1], "string("), ")"))
	sealed, err2 := strconv.Unquote(strings.TrimSuffix(strings.TrimPrefix(lines[2], "[]byte("), ")"))
	if err1 != nil || err2 != nil {
		t.Fatalf("%s: %v %v", path, err1, err2)
	}
	return id, []byte(sealed)
}

func FuzzOpenSealed(f *testing.F) {
	seeds, _ := filepath.Glob(filepath.Join("testdata", "fuzz", "FuzzOpenSealed", "*"))
	if len(seeds) == 0 {
		f.Fatal("seed corpus testdata/fuzz/FuzzOpenSealed is empty")
	}
	k := fixedKey(f)
	// The "valid" seed must really open, or the fuzzer never reaches the
	// success path.
	id, sealed := readSeed(f, filepath.Join("testdata", "fuzz", "FuzzOpenSealed", "valid"))
	buf, err := k.Open(id, sealed)
	if err != nil {
		f.Fatalf("seed \"valid\" does not open (regenerate it with KEYGATE_WRITE_FUZZ_SEEDS=1): %v", err)
	}
	buf.Destroy()
	f.Add("vol-1", []byte{1})
	f.Add("", []byte{})
	f.Fuzz(func(t *testing.T, id string, sealed []byte) {
		buf, err := k.Open(id, sealed)
		if err != nil {
			if !errors.Is(err, masterkey.ErrOpen) {
				t.Fatalf("error %v is not ErrOpen", err)
			}
			return
		}
		defer buf.Destroy()
		// Only a genuine blob opens; it must re-seal and open to the same bytes.
		if buf.Size() != len(sealed)-masterkey.SealOverhead {
			t.Fatalf("opened %d bytes from a %d-byte blob", buf.Size(), len(sealed))
		}
		resealed, err := k.Seal(id, buf.Bytes())
		if err != nil {
			t.Fatal(err)
		}
		again, err := k.Open(id, resealed)
		if err != nil {
			t.Fatal(err)
		}
		defer again.Destroy()
		if !bytes.Equal(again.Bytes(), buf.Bytes()) {
			t.Fatal("re-seal round trip changed the plaintext")
		}
	})
}
