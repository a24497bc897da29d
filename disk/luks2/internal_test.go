package luks2

import (
	"bytes"
	"crypto/rand"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/keygate/keygate/internal/testutil"
)

func TestAFSplitMerge(t *testing.T) {
	for _, hash := range []string{"sha1", "sha256", "sha512"} {
		for _, keySize := range []int{16, 32, 64, 65} {
			for _, stripes := range []int{1, 2, 4000} {
				t.Run(fmt.Sprintf("%s/key%d/stripes%d", hash, keySize, stripes), func(t *testing.T) {
					key := make([]byte, keySize)
					rand.Read(key)
					split := make([]byte, keySize*stripes)
					if err := afSplit(split, key, stripes, hash); err != nil {
						t.Fatal(err)
					}
					got := make([]byte, keySize)
					if err := afMerge(got, split, stripes, hash); err != nil {
						t.Fatal(err)
					}
					if !bytes.Equal(got, key) {
						t.Fatal("merge(split(key)) != key")
					}
					if stripes > 1 {
						split[0] ^= 1
						afMerge(got, split, stripes, hash)
						if bytes.Equal(got, key) {
							t.Fatal("a damaged first stripe still yields the key")
						}
					}
				})
			}
		}
	}
	if err := afSplit(make([]byte, 64), make([]byte, 64), 1, "md5"); !errors.Is(err, ErrNotSupported) {
		t.Errorf("md5 af hash: %v, want ErrNotSupported", err)
	}
}

// rewriteJSON replaces the metadata of both header copies of img with the
// result of edit on the decoded JSON tree, with valid checksums: a
// stand-in for another tool that writes fields keygate does not know.
func rewriteJSON(t *testing.T, img string, edit func(map[string]any)) {
	t.Helper()
	f, err := os.OpenFile(img, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	v, err := Open(f)
	if err != nil {
		t.Fatal(err)
	}
	js, _ := v.meta.encode()
	var tree map[string]any
	json.Unmarshal(js, &tree)
	edit(tree)
	js, _ = json.Marshal(tree)
	nb := v.bin
	nb.seqID++
	for _, sec := range []bool{false, true} {
		b, err := marshalCopy(nb, js, sec)
		if err != nil {
			t.Fatal(err)
		}
		off := int64(0)
		if sec {
			off = int64(nb.hdrSize)
		}
		f.WriteAt(b, off)
	}
}

func obj(tree map[string]any, path ...string) map[string]any {
	for _, p := range path {
		tree = tree[p].(map[string]any)
	}
	return tree
}

// TestUnknownFieldsSurvive: members keygate does not know, at every level
// of the metadata, are kept through a keygate update.
func TestUnknownFieldsSurvive(t *testing.T) {
	img := filepath.Join(t.TempDir(), "img")
	f, _ := os.Create(img)
	f.Truncate(20 << 20)
	_, vk, err := Format(f, []byte("pw"), FormatOptions{PBKDF: KeyPBKDF(), DigestIterations: 1000})
	if err != nil {
		t.Fatal(err)
	}
	f.Close()
	places := [][]string{{}, {"keyslots", "0"}, {"keyslots", "0", "af"}, {"keyslots", "0", "area"}, {"keyslots", "0", "kdf"},
		{"segments", "0"}, {"digests", "0"}, {"config"}}
	rewriteJSON(t, img, func(tree map[string]any) {
		for i, p := range places {
			obj(tree, p...)["x_future_"+strconv.Itoa(i)] = map[string]any{"n": float64(i), "s": "<&>"}
		}
		obj(tree, "config")["flags"] = []any{"allow-discards", "x-unknown-flag"}
		obj(tree, "tokens")["7"] = map[string]any{"type": "other", "keyslots": []any{"0"}, "blob": []any{1.5, true, nil}}
		obj(tree, "keyslots")["1"] = map[string]any{"type": "future-slot", "key_size": 1,
			"area": map[string]any{"type": "none", "offset": "1048576", "size": "4096"}, "opaque": "kept"}
	})
	f, _ = os.OpenFile(img, os.O_RDWR, 0)
	defer f.Close()
	v, err := Open(f)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := v.AddKeyslot(vk, []byte("second"), KeyPBKDF()); err != nil {
		t.Fatal(err)
	}
	if err := v.SetToken(2, Token{Type: "mine", Keyslots: []int{2}}); err != nil {
		t.Fatal(err)
	}
	if v2, err := Open(f); err != nil {
		t.Fatal(err)
	} else {
		v = v2
	}
	js, _ := v.meta.encode()
	var tree map[string]any
	json.Unmarshal(js, &tree)
	for i, p := range places {
		x, ok := obj(tree, p...)["x_future_"+strconv.Itoa(i)].(map[string]any)
		if !ok || x["s"] != "<&>" {
			t.Errorf("unknown member at %v lost: %s", p, js)
		}
	}
	if fmt.Sprint(obj(tree, "config")["flags"]) != "[allow-discards x-unknown-flag]" ||
		fmt.Sprint(obj(tree, "tokens", "7")["blob"]) != "[1.5 true <nil>]" ||
		obj(tree, "keyslots", "1")["opaque"] != "kept" {
		t.Errorf("flags, foreign token or opaque keyslot lost: %s", js)
	}
	// The new keyslot went around the opaque one's area.
	if ks := v.Keyslots(); len(ks) != 3 || ks[2].AreaOffset < 1048576+4096 && ks[2].AreaOffset+ks[2].AreaSize > 1048576 {
		t.Errorf("keyslots = %+v", ks)
	}
}

// TestRequirementsRefused: a volume with a mandatory requirement keygate
// does not know opens for inspection but refuses unlock and writes.
func TestRequirementsRefused(t *testing.T) {
	img := filepath.Join(t.TempDir(), "img")
	f, _ := os.Create(img)
	f.Truncate(20 << 20)
	if _, _, err := Format(f, []byte("pw"), FormatOptions{PBKDF: KeyPBKDF(), DigestIterations: 1000}); err != nil {
		t.Fatal(err)
	}
	f.Close()
	rewriteJSON(t, img, func(tree map[string]any) {
		obj(tree, "config")["requirements"] = map[string]any{"mandatory": []any{"online-reencrypt-v2"}}
	})
	f, _ = os.OpenFile(img, os.O_RDWR, 0)
	defer f.Close()
	v, err := Open(f)
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := v.Unlock([]byte("pw")); !errors.Is(err, ErrNotSupported) || !strings.Contains(err.Error(), "online-reencrypt-v2") {
		t.Errorf("Unlock = %v", err)
	}
	if err := v.SetToken(0, Token{Type: "x"}); !errors.Is(err, ErrNotSupported) {
		t.Errorf("SetToken = %v", err)
	}
}

// parseFuzzInput is the fuzz target's view of its input: a header copy
// with its trailing zero bytes trimmed (so seed files stay small), which
// is zero-extended back to the metadata size it declares. With fixCsum the
// checksum is recomputed first, so mutations reach the JSON parser instead
// of all stopping at the checksum check.
func parseFuzzInput(data []byte, fixCsum bool) (*headerCopy, *HeaderError) {
	buf, off, secondary := fuzzCopy(data, fixCsum)
	return parseCopy(buf, off, secondary)
}

// fuzzCopy turns a fuzz input into the header copy bytes it stands for and
// the offset the copy claims.
func fuzzCopy(data []byte, fixCsum bool) (buf []byte, off uint64, secondary bool) {
	buf = data
	secondary = bytes.HasPrefix(data, magicSecondary)
	if len(data) >= binHeaderSize {
		hs := binary.BigEndian.Uint64(data[offHdrSize:])
		if validHdrSize(hs) && uint64(len(data)) < hs {
			buf = make([]byte, hs)
			copy(buf, data)
		}
		if secondary {
			off = binary.BigEndian.Uint64(data[offHdrOffset:])
		}
		if h, ok := csumHash(cString(buf[offCsumAlg : offCsumAlg+lenCsumAlg])); ok && fixCsum && validHdrSize(hs) && uint64(len(buf)) >= hs {
			buf = bytes.Clone(buf[:hs])
			sum := checksum(h, buf)
			copy(buf[offCsum:offCsum+lenCsum], make([]byte, lenCsum))
			copy(buf[offCsum:], sum)
		}
	}
	return buf, off, secondary
}

// FuzzParseHeader fuzzes the header and JSON parser. Where a copy parses,
// it must re-encode into a copy that parses to the same metadata, and
// encoding must be a fixed point (cryptsetup's member order and spacing are
// not kept, their meaning is). The seeds are 16-32 KiB, so run it with a
// short minimisation time, or minimising each new input takes minutes:
//
//	go test -run '^$' -fuzz FuzzParseHeader -fuzztime 60s -fuzzminimizetime 1s ./disk/luks2/
func FuzzParseHeader(f *testing.F) {
	f.Fuzz(func(t *testing.T, data []byte, fixCsum bool) {
		c, herr := parseFuzzInput(data, fixCsum)
		if c == nil {
			if herr == nil || herr.Check == "" {
				t.Fatal("failure without a named check")
			}
			return
		}
		js, err := c.meta.encode()
		if err != nil {
			t.Fatalf("encode parsed metadata: %v", err)
		}
		buf, err := marshalCopy(c.bin, js, c.bin.hdrOffset != 0)
		if errors.Is(err, ErrNoSpace) {
			return // Go's encoder escapes <, > and &, which can grow a full area
		}
		if err != nil {
			t.Fatalf("marshal: %v", err)
		}
		c2, herr := parseCopy(buf, c.bin.hdrOffset, c.bin.hdrOffset != 0)
		if herr != nil {
			t.Fatalf("re-parse own output: %v", herr)
		}
		js2, _ := c2.meta.encode()
		if !bytes.Equal(js, js2) {
			t.Fatalf("round trip changed the metadata:\n%s\n%s", js, js2)
		}
		if c.bin != c2.bin {
			t.Fatalf("round trip changed the binary header: %+v vs %+v", c.bin, c2.bin)
		}
	})
}

// TestSeedCorpus: every committed seed named ok-* is a valid header (made
// by cryptsetup 2.6 or by keygate) and every bad-<check>-* seed (an ok
// seed edited by hand) fails exactly that check, so the corpus cannot
// silently rot into inputs that all fail the first check.
func TestSeedCorpus(t *testing.T) {
	for _, p := range testutil.Glob(t, "testdata/fuzz/FuzzParseHeader/*") {
		t.Run(filepath.Base(p), func(t *testing.T) {
			c, herr := parseFuzzInput(readSeed(t, p))
			name := filepath.Base(p)
			switch {
			case strings.HasPrefix(name, "ok-"):
				if c == nil {
					t.Fatalf("seed does not parse: %v", herr)
				}
			case strings.HasPrefix(name, "bad-"), strings.HasPrefix(name, "cap-"):
				// bad-<check>-<what> and cap-<check>-<what>: must fail
				// exactly that check.
				want := strings.SplitN(name, "-", 3)[1]
				if c != nil || herr.Check != want {
					t.Fatalf("got %v, want the %s check to fail", herr, want)
				}
			default:
				t.Fatalf("seed name must start with ok-, bad-<check>- or cap-<check>-")
			}
		})
	}
}

// TestSeedsAgreeWithCryptsetup: cryptsetup's verdict on each seed, placed
// alone in an image, matches keygate's (ok-* accepted, bad-* refused).
// cap-* seeds are headers cryptsetup accepts and keygate refuses on purpose:
// they ask for more work than keygate's caps allow (see validate.go).
func TestSeedsAgreeWithCryptsetup(t *testing.T) {
	cs := testutil.LookPath(t, "cryptsetup")
	for _, p := range testutil.Glob(t, "testdata/fuzz/FuzzParseHeader/*") {
		t.Run(filepath.Base(p), func(t *testing.T) {
			t.Parallel()
			data, fix := readSeed(t, p)
			buf, off, _ := fuzzCopy(data, fix)
			img := filepath.Join(t.TempDir(), "img")
			f, err := os.Create(img)
			if err != nil {
				t.Fatal(err)
			}
			f.Truncate(20 << 20)
			f.WriteAt(buf, int64(off))
			f.Close()
			out, err := exec.Command(cs, "luksDump", img).CombinedOutput()
			name := filepath.Base(p)
			if ok := strings.HasPrefix(name, "ok-") || strings.HasPrefix(name, "cap-"); ok != (err == nil) {
				t.Fatalf("cryptsetup luksDump: err=%v, keygate accepts=%v\n%s", err, ok, out)
			}
		})
	}
}

// readSeed decodes a corpus file for FuzzParseHeader(data, fixCsum).
func readSeed(t *testing.T, p string) ([]byte, bool) {
	t.Helper()
	raw, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(string(raw)), "\n")
	if len(lines) != 3 || lines[0] != "go test fuzz v1" || !strings.HasPrefix(lines[1], "[]byte(") || !strings.HasPrefix(lines[2], "bool(") {
		t.Fatalf("not a fuzz corpus file for (data []byte, fixCsum bool)")
	}
	data, err := strconv.Unquote(strings.TrimSuffix(strings.TrimPrefix(lines[1], "[]byte("), ")"))
	if err != nil {
		t.Fatal(err)
	}
	return []byte(data), lines[2] == "bool(true)"
}
