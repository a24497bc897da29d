package main

import (
	"bytes"
	"encoding/binary"
	"encoding/hex"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/keygate/keygate/internal/testutil"
)

// keygate runs the CLI in-process and fails the test on a non-zero exit.
func keygate(t *testing.T, args ...string) string {
	t.Helper()
	var out, errb bytes.Buffer
	if code := run(args, strings.NewReader(""), &out, &errb); code != 0 {
		t.Fatalf("keygate %s: exit %d: %s", strings.Join(args, " "), code, errb.String())
	}
	return out.String()
}

func cryptsetup(t *testing.T, args ...string) string {
	t.Helper()
	cs := testutil.LookPath(t, "cryptsetup")
	out, err := exec.Command(cs, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("cryptsetup %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// dumpVolumeKey asks cryptsetup, not keygate, for the volume key.
func dumpVolumeKey(t *testing.T, img, keyFile string) []byte {
	t.Helper()
	out := cryptsetup(t, "luksDump", "--dump-volume-key", "--batch-mode", "--key-file", keyFile, img)
	i := strings.Index(out, "MK dump:")
	if i < 0 {
		t.Fatalf("no 'MK dump:' in cryptsetup output:\n%s", out)
	}
	var hexs strings.Builder
	for _, f := range strings.Fields(out[i+len("MK dump:"):]) {
		if len(f) != 2 {
			break
		}
		hexs.WriteString(f)
	}
	key, err := hex.DecodeString(hexs.String())
	if err != nil || len(key) != 64 {
		t.Fatalf("parse volume key from cryptsetup (%d bytes, %v):\n%s", len(key), err, out)
	}
	return key
}

// python finds an interpreter with the cryptography package, the
// independent OpenSSL-backed AES-XTS reference.
func python(t *testing.T) string {
	t.Helper()
	for _, p := range []string{"python3", "/usr/bin/python3"} {
		if path, err := exec.LookPath(p); err == nil && exec.Command(path, "-c", "import cryptography").Run() == nil {
			return path
		}
	}
	testutil.Skip(t, "python-cryptography", "no python3 with the cryptography package (apt-get install python3-cryptography)")
	return ""
}

// opensslDecrypt decrypts the data-area sector of img that holds byte off
// of the plaintext, with OpenSSL's AES-XTS and the LUKS2 tweak, and returns
// that plaintext sector.
func opensslDecrypt(t *testing.T, img string, key []byte, dataOffset int64, sectorSize int, off int64) []byte {
	t.Helper()
	f, err := os.Open(img)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sector := off / int64(sectorSize)
	ct := make([]byte, sectorSize)
	if _, err := f.ReadAt(ct, dataOffset+sector*int64(sectorSize)); err != nil {
		t.Fatal(err)
	}
	tweak := sector * int64(sectorSize/512) // plain64 counts 512-byte units
	cmd := exec.Command(python(t), "testdata/xts_decrypt.py", hex.EncodeToString(key), strconv.FormatInt(tweak, 10))
	cmd.Stdin = bytes.NewReader(ct)
	pt, err := cmd.Output()
	if err != nil {
		t.Fatalf("python AES-XTS: %v", err)
	}
	return pt
}

// fsSignature checks the known bytes of a freshly made filesystem in its
// first plaintext bytes: the ext4 superblock magic, or the FAT32 boot sector.
func fsSignature(t *testing.T, fs string, pt []byte) {
	t.Helper()
	switch fs {
	case "ext4":
		// The superblock starts at byte 1024; s_magic is at 0x38 in it.
		if m := binary.LittleEndian.Uint16(pt[1024+0x38:]); m != 0xEF53 {
			t.Fatalf("ext4 superblock magic = %#x, want 0xef53", m)
		}
	case "fat32":
		if pt[510] != 0x55 || pt[511] != 0xAA || string(pt[82:90]) != "FAT32   " {
			t.Fatalf("no FAT32 boot sector: sig %x %x, type %q", pt[510], pt[511], pt[82:90])
		}
	}
}

const luksDataOffset = 16 << 20 // cryptsetup's and keygate's default

// TestKeygateToCryptsetup: images keygate made pass cryptsetup's checks, and
// their data area decrypts under OpenSSL with the key cryptsetup recovers.
func TestKeygateToCryptsetup(t *testing.T) {
	for _, tc := range []struct {
		name, fs, sector, pbkdf string
	}{
		{"ext4-4096-pbkdf2", "ext4", "4096", "pbkdf2"},
		{"ext4-512-argon2id", "ext4", "512", "argon2id"},
		{"fat32-4096-pbkdf2", "fat32", "4096", "pbkdf2"},
		{"fat32-512-pbkdf2", "fat32", "512", "pbkdf2"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			img, key := filepath.Join(dir, "v.img"), filepath.Join(dir, "k")
			os.WriteFile(key, []byte("keygate-made key file\n"), 0o600)
			keygate(t, "disk", "create", img, "--size", "64M", "--fs", tc.fs, "--sector-size", tc.sector, "--pbkdf", tc.pbkdf, "--key-file", key)

			dump := cryptsetup(t, "luksDump", img)
			for _, want := range []string{"Version:       \t2", "aes-xts-plain64", "sector: " + tc.sector} {
				if !strings.Contains(dump, want) {
					t.Errorf("luksDump lacks %q:\n%s", want, dump)
				}
			}
			cryptsetup(t, "open", "--test-passphrase", "--key-file", key, img)
			vk := dumpVolumeKey(t, img, key)
			fsSignature(t, tc.fs, firstPlaintext(t, img, vk, atoi(tc.sector)))
		})
	}
}

func atoi(s string) int {
	n, err := strconv.Atoi(s)
	if err != nil {
		panic(err)
	}
	return n
}

// firstPlaintext decrypts, sector by sector with OpenSSL, the first 4 KiB of
// the data area, where both filesystems keep their known bytes.
func firstPlaintext(t *testing.T, img string, vk []byte, sectorSize int) []byte {
	t.Helper()
	var pt []byte
	for off := int64(0); off < 4096; off += int64(sectorSize) {
		pt = append(pt, opensslDecrypt(t, img, vk, luksDataOffset, sectorSize, off)...)
	}
	return pt
}

// TestCryptsetupToKeygate: images cryptsetup luksFormat made open in keygate
// with the same key file; keygate makes a filesystem in them and moves files.
func TestCryptsetupToKeygate(t *testing.T) {
	for _, tc := range []struct {
		name, sector string
		pbkdf        []string
		fs           string
	}{
		{"512-pbkdf2-ext4", "512", []string{"--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"}, "ext4"},
		{"4096-pbkdf2-fat32", "4096", []string{"--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"}, "fat32"},
		{"4096-argon2id-ext4", "4096", []string{"--pbkdf", "argon2id", "--pbkdf-force-iterations", "4", "--pbkdf-memory", "32768", "--pbkdf-parallel", "1"}, "ext4"},
		{"512-argon2id-fat32", "512", []string{"--pbkdf", "argon2id", "--pbkdf-force-iterations", "4", "--pbkdf-memory", "32768", "--pbkdf-parallel", "1"}, "fat32"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			img, key := filepath.Join(dir, "v.img"), filepath.Join(dir, "k")
			os.WriteFile(key, []byte("cryptsetup-made key"), 0o600)
			if err := os.WriteFile(img, nil, 0o600); err != nil {
				t.Fatal(err)
			}
			if err := os.Truncate(img, 64<<20); err != nil {
				t.Fatal(err)
			}
			args := append([]string{"luksFormat", "--type", "luks2", "--batch-mode", "--sector-size", tc.sector, "--key-file", key}, tc.pbkdf...)
			cryptsetup(t, append(args, img)...)

			keygate(t, "disk", "mkfs", img, "--fs", tc.fs, "--key-file", key)
			local := filepath.Join(dir, "in.txt")
			os.WriteFile(local, []byte("written by keygate into a cryptsetup volume\n"), 0o644)
			keygate(t, "disk", "put", img, local, "/in.txt", "--key-file", key)
			if got := keygate(t, "disk", "cat", img, "/in.txt", "--key-file", key); got != "written by keygate into a cryptsetup volume\n" {
				t.Fatalf("cat = %q", got)
			}
			// cryptsetup still opens it, and the filesystem keygate wrote is
			// where cryptsetup's volume key says it is.
			cryptsetup(t, "open", "--test-passphrase", "--key-file", key, img)
			vk := dumpVolumeKey(t, img, key)
			fsSignature(t, tc.fs, firstPlaintext(t, img, vk, atoi(tc.sector)))
		})
	}
}
