package disk_test

import (
	"bytes"
	"crypto/hmac"
	"crypto/sha256"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"

	"github.com/awnumar/memguard"

	"github.com/keygate/keygate/disk"
	"github.com/keygate/keygate/internal/memscan"
	"github.com/keygate/keygate/internal/testutil"
)

// TestKeysLeaveNoCopy runs a whole image lifecycle with a pbkdf2 keyslot
// (as keygate's unwrap-key slot is): create, unlock, write and read a file,
// close, destroy the key. It then scans every readable mapping of the test
// process for the volume key, the key file, and the HMAC pads of both
// (key XOR 0x36 and 0x5c: the volume key is the HMAC key of the digest,
// the key file that of the keyslot's PBKDF2), each also with its 4-byte
// words swapped (SHA-256's message words in a little-endian schedule) and
// in 16-byte pieces, so a partial copy counts too. No range is skipped:
// once the key and the image are destroyed, no copy should remain
// anywhere, locked or not. The companion subtest keys crypto/hmac (which
// x/crypto/pbkdf2 uses) with the same key and expects the scan to find the
// pad, proving these needles and this scan can fail.
//
// Argon2 keyslots are not tested here: x/crypto/argon2 hashes the
// passphrase with blake2b, which buffers it on the heap, and keeps its
// working memory there (see "Key material in memory" in docs/format.md).
//
// What the scan cannot see: CPU registers, kernel memory (the page cache
// of the image and of the key file), and memory of other processes.
func TestKeysLeaveNoCopy(t *testing.T) {
	cryptsetup := testutil.LookPath(t, "cryptsetup")
	dir := t.TempDir()
	keyFile, img := filepath.Join(dir, "key"), filepath.Join(dir, "img")

	// The key file: drawn in locked memory and written from there.
	kb := memguard.NewBufferRandom(32)
	kf := memscan.NewNeedle("key file", kb.Bytes())
	err := os.WriteFile(keyFile, kb.Bytes(), 0o600)
	kb.Destroy()
	if err != nil {
		t.Fatal(err)
	}
	key, err := disk.ReadKeyFile(keyFile)
	if err != nil {
		t.Fatal(err)
	}
	defer key.Destroy() // already destroyed below unless the test fails first
	if _, err := disk.CreateImage(img, key, disk.CreateOptions{Size: 32 << 20, FS: disk.Ext4, PBKDF: disk.PBKDF2}); err != nil {
		t.Fatal(err)
	}
	vk := dumpVolumeKey(t, cryptsetup, keyFile, img)

	im, err := disk.OpenImage(img, key, true)
	if err != nil {
		t.Fatal(err)
	}
	fs, err := im.FS()
	if err != nil {
		im.Close()
		t.Fatal(err)
	}
	const text = "hello from inside the volume\n"
	err = fs.Put("/hello.txt", strings.NewReader(text), int64(len(text)))
	var got bytes.Buffer
	if err == nil {
		_, err = fs.Get("/hello.txt", &got)
	}
	if err := errors.Join(err, im.Close()); err != nil {
		t.Fatal(err)
	}
	if got.String() != text {
		t.Fatalf("read back %q, want %q", got.String(), text)
	}
	key.Destroy()
	runtime.GC()

	var needles []memscan.Needle
	for _, secret := range []memscan.Needle{vk, kf} {
		for _, v := range []memscan.Needle{secret, secret.Xor(0x36), secret.Xor(0x5c)} {
			needles = append(needles, v.Chunks(16)...)
			needles = append(needles, v.SwapWords(4).Chunks(16)...)
		}
	}
	res := scan(t, needles)
	for _, h := range res.Hits {
		t.Errorf("key material left in memory: %v", h)
	}

	t.Run("crypto/hmac's pad is found", func(t *testing.T) {
		// The key, rebuilt in locked memory (skipped) from its needle.
		lk := memguard.NewBuffer(kf.Len())
		defer lk.Destroy()
		kf.Reveal(lk.Bytes())
		m := hmac.New(sha256.New, lk.Bytes()) // copies key^0x36 and key^0x5c to the heap
		res := scan(t, needles, memscan.RangeOf(lk.Bytes()))
		runtime.KeepAlive(m)
		found := map[string]bool{}
		for _, h := range res.Hits {
			found[strings.TrimSuffix(h.Needle, "[0:16]")] = true
		}
		for _, want := range []string{kf.Xor(0x36).Name, kf.Xor(0x5c).Name} {
			if !found[want] {
				t.Errorf("the scan missed %s, which crypto/hmac keeps on the heap; hits: %v", want, res.Hits)
			}
		}
	})
}

func scan(t *testing.T, needles []memscan.Needle, skip ...memscan.Range) *memscan.Result {
	t.Helper()
	res, err := memscan.Scan(needles, skip...)
	if errors.Is(err, memscan.ErrUnavailable) {
		testutil.Skip(t, "procmem", err.Error())
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("scanned %d MiB in %d mappings for %d needles", res.Scanned>>20, res.Mappings, len(needles))
	return res
}

// dumpVolumeKey asks cryptsetup for the volume key and returns a needle
// for it. cryptsetup writes straight into a file (not through a Go
// buffer), the file is read into locked memory, the hex is decoded into
// locked memory, and both buffers are destroyed once the needle holds
// the key complemented.
func dumpVolumeKey(t *testing.T, cryptsetup, keyFile, img string) memscan.Needle {
	t.Helper()
	out, err := os.CreateTemp(t.TempDir(), "dump")
	if err != nil {
		t.Fatal(err)
	}
	defer out.Close()
	var stderr bytes.Buffer
	cmd := exec.Command(cryptsetup, "luksDump", "--dump-volume-key", "--batch-mode", "--key-file", keyFile, img)
	cmd.Stdout, cmd.Stderr = out, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("cryptsetup luksDump --dump-volume-key: %v\n%s", err, stderr.Bytes())
	}
	st, err := out.Stat()
	if err != nil {
		t.Fatal(err)
	}
	text := memguard.NewBuffer(int(st.Size()))
	defer text.Destroy()
	if _, err := out.ReadAt(text.Bytes(), 0); err != nil && err != io.EOF {
		t.Fatal(err)
	}
	i := bytes.Index(text.Bytes(), []byte("MK dump:"))
	if i < 0 {
		t.Fatal("no 'MK dump:' in cryptsetup's output")
	}
	vk := memguard.NewBuffer(64)
	defer vk.Destroy()
	n := 0
	hi := -1
	for _, c := range text.Bytes()[i+len("MK dump:"):] {
		var v int
		switch {
		case c == ' ' || c == '\t' || c == '\n':
			continue
		case '0' <= c && c <= '9':
			v = int(c - '0')
		case 'a' <= c && c <= 'f':
			v = int(c-'a') + 10
		default:
			t.Fatalf("unexpected %q in the MK dump", c)
		}
		if n == vk.Size() {
			t.Fatalf("the MK dump is longer than %d bytes", vk.Size())
		}
		if hi < 0 {
			hi = v
			continue
		}
		vk.Bytes()[n] = byte(hi<<4 | v)
		n, hi = n+1, -1
	}
	if n != vk.Size() || hi >= 0 {
		t.Fatalf("the MK dump holds %d bytes, want %d", n, vk.Size())
	}
	return memscan.NewNeedle("volume key", vk.Bytes())
}
