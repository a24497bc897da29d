package disk_test

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/keygate/keygate/disk"
	"github.com/keygate/keygate/disk/luks2"
)

func writeKey(t *testing.T, dir, name, content string) *disk.Key {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	k, err := disk.ReadKeyFile(p)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(k.Destroy)
	return k
}

// dirEntries lists dir, so tests can prove a failure left no temporary file.
func dirEntries(t *testing.T, dir string) []string {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	return names
}

func TestReadKeyFile(t *testing.T) {
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "empty"), nil, 0o600)
	os.WriteFile(filepath.Join(dir, "nl"), []byte("secret\n"), 0o600)
	big, _ := os.Create(filepath.Join(dir, "big"))
	big.Truncate(8<<20 + 1)
	big.Close()
	for _, tc := range []struct{ name, path, want string }{
		{"missing", "nope", "no such file"},
		{"empty", "empty", "the file is empty"},
		{"directory", ".", "not a regular file"},
		{"too big", "big", "8 MiB"},
		{"trailing newline kept", "nl", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			k, err := disk.ReadKeyFile(filepath.Join(dir, tc.path))
			if tc.want == "" {
				if err != nil {
					t.Fatal(err)
				}
				defer k.Destroy()
				if string(k.Bytes()) != "secret\n" {
					t.Fatalf("key = %q, want the file's bytes as they are", k.Bytes())
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want one mentioning %q", err, tc.want)
			}
		})
	}
}

// TestCreateImageFailuresLeaveNothing: a create that fails, at any stage,
// leaves neither IMAGE nor a temporary file behind, and never touches an
// existing file.
func TestCreateImageFailuresLeaveNothing(t *testing.T) {
	dir := t.TempDir()
	key := writeKey(t, t.TempDir(), "k", "key")
	os.WriteFile(filepath.Join(dir, "exists.img"), []byte("precious"), 0o600)
	for _, tc := range []struct {
		name string
		img  string
		opts disk.CreateOptions
		want string
	}{
		{"too small", "a.img", disk.CreateOptions{Size: 16 << 20, PBKDF: disk.PBKDF2}, "too small"},
		{"bad sector size", "b.img", disk.CreateOptions{Size: 32 << 20, SectorSize: 1024, PBKDF: disk.PBKDF2}, "sector size"},
		{"exists", "exists.img", disk.CreateOptions{Size: 32 << 20, PBKDF: disk.PBKDF2}, "exists"},
		{"no room for ext4", "c.img", disk.CreateOptions{Size: 17 << 20, FS: disk.Ext4, PBKDF: disk.PBKDF2}, "ext4"},
		{"no room for fat32", "d.img", disk.CreateOptions{Size: 17 << 20, FS: disk.FAT32, PBKDF: disk.PBKDF2}, "fat32"},
		{"unknown fs", "e.img", disk.CreateOptions{Size: 32 << 20, FS: "zfs", PBKDF: disk.PBKDF2}, "zfs"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := disk.CreateImage(filepath.Join(dir, tc.img), key, tc.opts)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want one mentioning %q", err, tc.want)
			}
			if got := dirEntries(t, dir); len(got) != 1 || got[0] != "exists.img" {
				t.Fatalf("directory after failed create: %v, want only exists.img", got)
			}
			if b, _ := os.ReadFile(filepath.Join(dir, "exists.img")); string(b) != "precious" {
				t.Fatalf("existing file changed to %q", b)
			}
		})
	}
}

// TestRecoveryAndKeyslots: the recovery passphrase printed once opens the
// volume; add-key and remove-key keep every other key working; the last
// keyslot goes only when forced, after which nothing opens the volume.
func TestRecoveryAndKeyslots(t *testing.T) {
	dir := t.TempDir()
	img := filepath.Join(dir, "v.img")
	k1 := writeKey(t, dir, "k1", "first")
	k2 := writeKey(t, dir, "k2", "second")
	res, err := disk.CreateImage(img, k1, disk.CreateOptions{Size: 32 << 20, FS: disk.Ext4, PBKDF: disk.PBKDF2, Recovery: true})
	if err != nil {
		t.Fatal(err)
	}
	if res.Recovery == nil || res.RecoverySlot != 1 {
		t.Fatalf("recovery slot %d, passphrase present %v", res.RecoverySlot, res.Recovery != nil)
	}
	rec, err := disk.NewKey(res.Recovery.Bytes())
	if err != nil {
		t.Fatal(err)
	}
	defer rec.Destroy()
	if p := string(rec.Bytes()); len(p) != 55 || strings.Count(p, "-") != 7 {
		t.Fatalf("recovery passphrase %q is not 8 dash-separated groups of 6", p)
	}
	res.Wipe()
	if in, err := disk.Inspect(img); err != nil || in.Keyslots[1].PBKDF.Type != "argon2id" {
		t.Fatalf("recovery keyslot: %+v, %v; want argon2id", in.Keyslots, err)
	}

	open := func(k *disk.Key) error {
		im, err := disk.OpenImage(img, k, false)
		if err != nil {
			return err
		}
		_, err = im.FS()
		return errors.Join(err, im.Close())
	}
	if err := open(rec); err != nil {
		t.Fatalf("recovery passphrase does not open the volume: %v", err)
	}
	if err := open(k2); !errors.Is(err, luks2.ErrWrongKey) {
		t.Fatalf("k2 before add-key: %v, want ErrWrongKey", err)
	}
	if _, err := disk.AddKey(img, k2, k2, disk.PBKDF2); !errors.Is(err, luks2.ErrWrongKey) {
		t.Fatalf("add-key authorised by an unknown key: %v, want ErrWrongKey", err)
	}
	slot, err := disk.AddKey(img, rec, k2, disk.PBKDF2)
	if err != nil || slot != 2 {
		t.Fatalf("add-key = %d, %v", slot, err)
	}
	for _, s := range []int{0, 1} {
		if err := disk.RemoveKey(img, k2, s, false); err != nil {
			t.Fatalf("remove-key %d: %v", s, err)
		}
	}
	if err := open(k1); !errors.Is(err, luks2.ErrWrongKey) {
		t.Fatalf("k1 after its slot was removed: %v, want ErrWrongKey", err)
	}
	before, _ := os.ReadFile(img)
	if err := disk.RemoveKey(img, k2, 2, false); !errors.Is(err, luks2.ErrLastKeyslot) || !strings.Contains(err.Error(), "--force") {
		t.Fatalf("remove last keyslot: %v, want ErrLastKeyslot naming --force", err)
	}
	if after, _ := os.ReadFile(img); !bytes.Equal(before, after) {
		t.Fatal("refused remove-key changed the image")
	}
	if err := disk.RemoveKey(img, k2, 2, true); err != nil {
		t.Fatal(err)
	}
	if err := open(k2); err == nil || !strings.Contains(err.Error(), "crypto-erased") {
		t.Fatalf("open after the last keyslot was forced out: %v, want crypto-erased", err)
	}
}
