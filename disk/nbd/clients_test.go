package nbd_test

import (
	"bytes"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"testing"

	"golang.org/x/crypto/xts"

	"github.com/keygate/keygate/disk"
	"github.com/keygate/keygate/disk/nbd"
)

// TestRealClientsEncrypted writes a raw disk image into an encrypted
// volume through the export with qemu-img, reads it back with nbdcopy over
// several connections, then checks the image's ciphertext independently:
// cryptsetup gives the volume key, x/crypto/xts decrypts the data segment.
func TestRealClientsEncrypted(t *testing.T) {
	for _, ss := range []int{512, 4096} {
		t.Run(fmt.Sprintf("sector%d", ss), func(t *testing.T) {
			const size = 48 << 20
			img, keyFile, im := encrypted(t, size, ss)
			b := im.Blocks()
			_, sock := serve(t, b, nbd.Options{MinBlock: uint32(ss), PreferredBlock: uint32(ss)})
			src := randBytes(t, int(b.Size()))
			srcFile := writeFile(t, src)

			run(t, "qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", srcFile, uri(sock))
			back := filepath.Join(t.TempDir(), "back.raw")
			run(t, "nbdcopy", "--connections=4", uri(sock), back)
			got, err := os.ReadFile(back)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, src) {
				t.Fatal("nbdcopy read back different bytes than qemu-img wrote")
			}
			if err := im.Close(); err != nil {
				t.Fatal(err)
			}
			plain := decryptWithCryptsetupKey(t, img, keyFile, ss)
			if !bytes.Equal(plain, src) {
				t.Fatal("the image's data segment, decrypted with cryptsetup's volume key by x/crypto/xts, differs from what was written")
			}
		})
	}
}

// decryptWithCryptsetupKey decrypts the data segment of img (at
// disk.DataOffset) with the volume key cryptsetup dumps.
func decryptWithCryptsetupKey(t *testing.T, img, keyFile string, ss int) []byte {
	t.Helper()
	out := run(t, "cryptsetup", "luksDump", "--dump-volume-key", "--batch-mode", "--key-file", keyFile, img)
	m := regexp.MustCompile(`(?s)MK dump:\s*((?:[0-9a-f]{2}\s*)+)`).FindStringSubmatch(out)
	if m == nil {
		t.Fatalf("no volume key in luksDump output:\n%s", out)
	}
	key, err := hex.DecodeString(regexp.MustCompile(`\s+`).ReplaceAllString(m[1], ""))
	if err != nil || len(key) != 64 {
		t.Fatalf("volume key %q: %v", m[1], err)
	}
	c, err := xts.NewCipher(newAES, key)
	if err != nil {
		t.Fatal(err)
	}
	raw, err := os.ReadFile(img)
	if err != nil {
		t.Fatal(err)
	}
	data := raw[disk.DataOffset:]
	plain := make([]byte, len(data))
	for i := 0; i < len(data); i += ss {
		// plain64 counts 512-byte units, whatever the sector size.
		c.Decrypt(plain[i:i+ss], data[i:i+ss], uint64(i/512))
	}
	return plain
}

// TestNbdinfo checks what the handshake advertises, as libnbd reads it.
func TestNbdinfo(t *testing.T) {
	for _, tc := range []struct {
		name     string
		readOnly bool
		ss       uint32
	}{
		{"writable-4096", false, 4096},
		{"readonly-512", true, 512},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := newFileBackend(t, 8<<20)
			_, sock := serve(t, b, nbd.Options{ReadOnly: tc.readOnly, MinBlock: tc.ss, PreferredBlock: tc.ss})
			var info struct {
				Exports []struct {
					Size         int64  `json:"export-size"`
					ReadOnly     bool   `json:"is_read_only"`
					CanFlush     bool   `json:"can_flush"`
					CanFUA       bool   `json:"can_fua"`
					CanZero      bool   `json:"can_zero"`
					CanMultiConn bool   `json:"can_multi_conn"`
					CanTrim      bool   `json:"can_trim"`
					MinBlock     uint32 `json:"block_size_minimum"`
					PrefBlock    uint32 `json:"block_size_preferred"`
					MaxBlock     uint32 `json:"block_size_maximum"`
				} `json:"exports"`
			}
			out := run(t, "nbdinfo", "--json", uri(sock))
			if err := json.Unmarshal([]byte(out), &info); err != nil || len(info.Exports) != 1 {
				t.Fatalf("nbdinfo --json: %v\n%s", err, out)
			}
			e := info.Exports[0]
			want := []struct {
				what      string
				got, want any
			}{
				{"size", e.Size, int64(8 << 20)},
				{"read only", e.ReadOnly, tc.readOnly},
				{"can flush", e.CanFlush, true},
				{"can fua", e.CanFUA, true},
				{"can zero", e.CanZero, true},
				{"can multi-conn", e.CanMultiConn, true},
				{"can trim", e.CanTrim, false},
				{"minimum block", e.MinBlock, tc.ss},
				{"preferred block", e.PrefBlock, tc.ss},
				{"maximum block", e.MaxBlock, uint32(nbd.DefaultMaxRequest)},
			}
			for _, w := range want {
				if w.got != w.want {
					t.Errorf("%s: nbdinfo says %v, want %v", w.what, w.got, w.want)
				}
			}
		})
	}
}

// TestQemuIO drives the commands qemu-img does not: unaligned writes
// (read-modify-write), write-zeroes, FUA and flush, each checked by
// reading back with a pattern.
func TestQemuIO(t *testing.T) {
	_, _, im := encrypted(t, 24<<20, 4096)
	_, sock := serve(t, im.Blocks(), nbd.Options{MinBlock: 4096, PreferredBlock: 4096})
	steps := []struct {
		name string
		cmd  string
	}{
		{"aligned write", "write -P 0x11 0 64k"},
		{"unaligned write inside a sector", "write -P 0x22 100 300"},
		{"unaligned write across sectors", "write -P 0x33 4000 200"},
		{"fua write", "write -f -P 0x44 8192 4096"},
		{"write zeroes", "write -z 16384 8192"},
		{"flush", "flush"},
		{"read aligned", "read -P 0x11 0 100"},
		{"read rmw 1", "read -P 0x22 100 300"},
		{"read between", "read -P 0x11 400 3600"},
		{"read rmw 2", "read -P 0x33 4000 200"},
		{"read after", "read -P 0x11 4200 3992"},
		{"read fua", "read -P 0x44 8192 4096"},
		{"read zeroes", "read -P 0 16384 8192"},
	}
	for _, s := range steps {
		t.Run(s.name, func(t *testing.T) {
			out := run(t, "qemu-io", "-f", "raw", "-c", s.cmd, uri(sock))
			if regexp.MustCompile(`(?i)fail|error|mismatch`).MatchString(out) {
				t.Fatalf("qemu-io %q:\n%s", s.cmd, out)
			}
		})
	}
}
