package masterkey_test

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/keygate/keygate/keysvc/masterkey"
)

// sameKey reports whether a and b are the same master key, by sealing with
// one and opening with the other.
func sameKey(t *testing.T, a, b *masterkey.Key) bool {
	t.Helper()
	sealed, err := a.Seal("probe", []byte("x"))
	if err != nil {
		t.Fatal(err)
	}
	buf, err := b.Open("probe", sealed)
	if err != nil {
		return false
	}
	buf.Destroy()
	return true
}

// noTempFiles fails if a creation left a temporary file behind.
func noTempFiles(t *testing.T, dir string) {
	t.Helper()
	m, _ := filepath.Glob(filepath.Join(dir, ".masterkey-*"))
	if len(m) != 0 {
		t.Errorf("temporary files left behind: %v", m)
	}
}

func TestLoadOrCreate(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "sub", "master.key")

	k1, created, err := masterkey.LoadOrCreate(path)
	if err != nil || !created {
		t.Fatalf("first LoadOrCreate: created=%v err=%v, want created", created, err)
	}
	defer k1.Destroy()
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode().Perm() != 0o600 || st.Size() != masterkey.Size {
		t.Errorf("key file mode %v size %d, want 0600 and %d", st.Mode().Perm(), st.Size(), masterkey.Size)
	}
	noTempFiles(t, filepath.Dir(path))

	k2, created, err := masterkey.LoadOrCreate(path)
	if err != nil || created {
		t.Fatalf("second LoadOrCreate: created=%v err=%v, want loaded", created, err)
	}
	defer k2.Destroy()
	if !sameKey(t, k1, k2) {
		t.Error("reloaded key differs from the created one")
	}

	other, _, err := masterkey.LoadOrCreate(filepath.Join(dir, "other.key"))
	if err != nil {
		t.Fatal(err)
	}
	defer other.Destroy()
	if sameKey(t, k1, other) {
		t.Error("two created keys are equal")
	}
}

func TestLoadOrCreateConcurrent(t *testing.T) {
	path := filepath.Join(t.TempDir(), "master.key")
	const n = 8
	keys := make([]*masterkey.Key, n)
	created := make([]bool, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			k, c, err := masterkey.LoadOrCreate(path)
			if err != nil {
				t.Error(err)
				return
			}
			keys[i], created[i] = k, c
		})
	}
	wg.Wait()
	if t.Failed() {
		return
	}
	ncreated := 0
	for i, k := range keys {
		defer k.Destroy()
		if created[i] {
			ncreated++
		}
		if !sameKey(t, keys[0], k) {
			t.Errorf("goroutine %d got a different key", i)
		}
	}
	if ncreated != 1 {
		t.Errorf("%d goroutines report creating the key, want 1", ncreated)
	}
	noTempFiles(t, filepath.Dir(path))
}

func TestLoadRefuses(t *testing.T) {
	good := bytes.Repeat([]byte{7}, masterkey.Size)
	tests := []struct {
		name    string
		content []byte
		mode    os.FileMode
		dir     bool
		wantFix string
	}{
		{name: "group readable", content: good, mode: 0o640, wantFix: "chmod 600"},
		{name: "other readable", content: good, mode: 0o604, wantFix: "chmod 600"},
		{name: "group writable", content: good, mode: 0o620, wantFix: "chmod 600"},
		{name: "short", content: good[:16], mode: 0o600, wantFix: "restore it from backup"},
		{name: "long", content: append(good, 0), mode: 0o600, wantFix: "restore it from backup"},
		{name: "empty", content: nil, mode: 0o600, wantFix: "restore it from backup"},
		{name: "directory", dir: true, wantFix: "restore the key file from backup"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "master.key")
			if tt.dir {
				if err := os.Mkdir(path, 0o700); err != nil {
					t.Fatal(err)
				}
			} else {
				if err := os.WriteFile(path, tt.content, 0o600); err != nil {
					t.Fatal(err)
				}
				if err := os.Chmod(path, tt.mode); err != nil {
					t.Fatal(err)
				}
			}
			k, _, err := masterkey.LoadOrCreate(path)
			if err == nil {
				k.Destroy()
				t.Fatal("LoadOrCreate accepted the file")
			}
			if !errors.Is(err, masterkey.ErrKeyFile) {
				t.Errorf("error %v, want ErrKeyFile", err)
			}
			if !strings.Contains(err.Error(), tt.wantFix) {
				t.Errorf("error %q does not name the fix %q", err, tt.wantFix)
			}
			if !tt.dir {
				if got, _ := os.ReadFile(path); !bytes.Equal(got, tt.content) {
					t.Error("refused key file was modified")
				}
			}
		})
	}
}

func TestFromPassphrase(t *testing.T) {
	salt := []byte("0123456789abcdef")
	k1, err := masterkey.FromPassphrase([]byte("correct horse"), salt)
	if err != nil {
		t.Fatal(err)
	}
	defer k1.Destroy()
	k2, err := masterkey.FromPassphrase([]byte("correct horse"), salt)
	if err != nil {
		t.Fatal(err)
	}
	defer k2.Destroy()
	if !sameKey(t, k1, k2) {
		t.Error("same passphrase and salt gave different keys")
	}
	k3, err := masterkey.FromPassphrase([]byte("correct horse"), []byte("fedcba9876543210"))
	if err != nil {
		t.Fatal(err)
	}
	defer k3.Destroy()
	if sameKey(t, k1, k3) {
		t.Error("different salts gave the same key")
	}

	for _, tt := range []struct {
		name       string
		pass, salt []byte
	}{
		{"empty passphrase", nil, salt},
		{"short salt", []byte("pw"), salt[:15]},
	} {
		t.Run(tt.name, func(t *testing.T) {
			if k, err := masterkey.FromPassphrase(tt.pass, tt.salt); err == nil {
				k.Destroy()
				t.Error("accepted")
			}
		})
	}
}

func TestDerive(t *testing.T) {
	k, _, err := masterkey.LoadOrCreate(filepath.Join(t.TempDir(), "master.key"))
	if err != nil {
		t.Fatal(err)
	}
	defer k.Destroy()
	labels := []string{masterkey.LabelChallengeMAC, masterkey.LabelAuditMAC, masterkey.LabelRecords, "keygate audit mac v2"}
	seen := map[string]string{}
	for _, l := range labels {
		a, err := k.Derive(l)
		if err != nil {
			t.Fatal(err)
		}
		b, err := k.Derive(l)
		if err != nil {
			t.Fatal(err)
		}
		if a.Size() != masterkey.Size || !bytes.Equal(a.Bytes(), b.Bytes()) {
			t.Errorf("Derive(%q) is not stable or not %d bytes", l, masterkey.Size)
		}
		if prev, ok := seen[string(a.Bytes())]; ok {
			t.Errorf("Derive(%q) equals Derive(%q)", l, prev)
		}
		seen[string(a.Bytes())] = l
		a.Destroy()
		b.Destroy()
	}
	if _, err := k.Derive(""); err == nil {
		t.Error("Derive accepted an empty label")
	}
}
