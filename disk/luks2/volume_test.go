package luks2_test

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"reflect"
	"strings"
	"testing"

	"github.com/keygate/keygate/disk/luks2"
)

func openVol(t *testing.T, img string) *luks2.Volume {
	t.Helper()
	v, err := luks2.Open(openRW(t, img))
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	return v
}

// patch overwrites bytes of the image at off.
func patch(t *testing.T, img string, off int64, b []byte) {
	t.Helper()
	f := openRW(t, img)
	if _, err := f.WriteAt(b, off); err != nil {
		t.Fatal(err)
	}
}

// Byte offsets of fields the corruption tests damage.
const (
	primary   = 0
	secondary = luks2.MetadataSize
	magicOff  = 0
	verOff    = 7
	hdrOffOff = 263
	jsonOff   = 4096 + 2
)

func TestWrongKey(t *testing.T) {
	t.Parallel()
	img, vk := format(t, []byte("right"), luks2.FormatOptions{})
	before := fileHash(t, img)
	v := openVol(t, img)
	for _, c := range []struct {
		name string
		try  func() error
	}{
		{"Unlock", func() error { _, _, err := v.Unlock([]byte("wrong")); return err }},
		{"UnlockSlot", func() error { _, err := v.UnlockSlot(0, []byte("wrong")); return err }},
		{"UnlockToken/missing", func() error { _, _, err := v.UnlockToken(0, []byte("right")); return err }},
		{"AddKeyslot/wrong volume key", func() error {
			bad := bytes.Clone(vk)
			bad[0] ^= 1
			_, err := v.AddKeyslot(lockedKey(bad), []byte("x"), cheapPBKDF2)
			return err
		}},
	} {
		t.Run(c.name, func(t *testing.T) {
			err := c.try()
			if err == nil {
				t.Fatal("succeeded")
			}
			if c.name != "UnlockToken/missing" && !errors.Is(err, luks2.ErrWrongKey) {
				t.Errorf("error %v is not ErrWrongKey", err)
			}
			if strings.Contains(err.Error(), "wrong\x00") || strings.Contains(err.Error(), string(vk)) {
				t.Errorf("error leaks a secret: %v", err)
			}
			if after := fileHash(t, img); after != before {
				t.Errorf("image changed")
			}
		})
	}
	if _, err := v.UnlockSlot(0, []byte("right")); err != nil {
		t.Fatalf("right key: %v", err)
	}
}

func TestCorruptPrimaryOpensFromSecondary(t *testing.T) {
	for _, c := range []struct {
		name  string
		off   int64
		bytes []byte
		check string
	}{
		{"json byte", primary + jsonOff, []byte("X"), luks2.CheckChecksum},
		{"magic", primary + magicOff, []byte("XXXX"), luks2.CheckMagic},
		{"version", primary + verOff, []byte{9}, luks2.CheckVersion},
		{"hdr_offset", primary + hdrOffOff, []byte{1}, luks2.CheckOffset},
		{"whole binary header zeroed", primary, make([]byte, 4096), luks2.CheckMagic},
	} {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			pass := []byte("pw")
			img, vk := format(t, pass, luks2.FormatOptions{})
			patch(t, img, c.off, c.bytes)
			v := openVol(t, img)
			h := v.Headers()
			if h[0].OK || !strings.HasPrefix(h[0].Problem, c.check) || !h[1].OK {
				t.Fatalf("Headers() = %+v, want primary failing %s", h, c.check)
			}
			if got, _ := unlock(t, v, pass); !bytes.Equal(got, vk) {
				t.Fatal("wrong volume key from the secondary header")
			}
			// The next write repairs the primary.
			if _, err := v.AddToken(luks2.Token{Type: "note", Fields: nil}); err != nil {
				t.Fatalf("AddToken: %v", err)
			}
			h = openVol(t, img).Headers()
			if !h[0].OK || !h[1].OK || h[0].SeqID != h[1].SeqID {
				t.Fatalf("after a write, Headers() = %+v", h)
			}
			cryptsetup(t, "open", "--test-passphrase", "--key-file", writeKeyFile(t, pass), img)
		})
	}
}

func TestBothCopiesCorrupt(t *testing.T) {
	for _, c := range []struct {
		name       string
		pOff, sOff int64
		pB, sB     []byte
		want       []string
		is         error
	}{
		{"checksum and magic", jsonOff, secondary + magicOff, []byte("X"), []byte("XX"),
			[]string{"primary header: checksum (checksum mismatch)", "secondary header: magic"}, luks2.ErrCorruptHeader},
		{"checksum and checksum", jsonOff, secondary + jsonOff, []byte("X"), []byte("X"),
			[]string{"primary header: checksum", "secondary header: checksum"}, luks2.ErrCorruptHeader},
		{"version and hdr_offset", verOff, secondary + hdrOffOff, []byte{1}, []byte{7},
			[]string{"primary header: version (this is a LUKS1 header", "secondary header: hdr_offset"}, luks2.ErrCorruptHeader},
		{"magic and magic", magicOff, secondary + magicOff, []byte("X"), []byte("X"),
			[]string{"primary header: magic", "not a LUKS2 volume"}, luks2.ErrNotLUKS2},
	} {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			img, _ := format(t, []byte("pw"), luks2.FormatOptions{})
			patch(t, img, c.pOff, c.pB)
			patch(t, img, c.sOff, c.sB)
			_, err := luks2.Open(openRW(t, img))
			if err == nil {
				t.Fatal("Open succeeded")
			}
			for _, w := range c.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q lacks %q", err, w)
				}
			}
			if !errors.Is(err, c.is) {
				t.Errorf("error %v is not %v", err, c.is)
			}
		})
	}
}

func TestInterruptedUpdate(t *testing.T) {
	crash := errors.New("simulated crash")
	for _, c := range []struct {
		name    string
		hook    func(img string) func() error
		after   func(t *testing.T, img string)
		newSlot bool // whether the interrupted AddKeyslot is visible
	}{
		{"stop after first copy", func(string) func() error { return func() error { return crash } }, nil, true},
		{"first copy torn", func(img string) func() error {
			return func() error {
				f, _ := os.OpenFile(img, os.O_RDWR, 0)
				defer f.Close()
				f.WriteAt(make([]byte, 2048), secondary+4200)
				return crash
			}
		}, nil, false},
		{"second copy torn", nil, func(t *testing.T, img string) { patch(t, img, primary+4200, make([]byte, 3000)) }, true},
	} {
		t.Run(c.name, func(t *testing.T) {
			pass0, pass1 := []byte("old"), []byte("new")
			img, vk := format(t, pass0, luks2.FormatOptions{})
			v := openVol(t, img)
			if c.hook != nil {
				defer luks2.SetAfterFirstCopy(c.hook(img))()
			}
			_, err := v.AddKeyslot(lockedKey(vk), pass1, cheapPBKDF2)
			if c.hook != nil && !errors.Is(err, crash) {
				t.Fatalf("AddKeyslot = %v, want the crash", err)
			}
			luks2.SetAfterFirstCopy(nil)()
			if c.after != nil {
				c.after(t, img)
			}
			v = openVol(t, img)
			if got, _ := unlock(t, v, pass0); !bytes.Equal(got, vk) {
				t.Fatal("old key lost")
			}
			_, _, err = v.Unlock(pass1)
			if (err == nil) != c.newSlot {
				t.Fatalf("new key unlock: %v, want visible=%v", err, c.newSlot)
			}
			if h := v.Headers(); h[0].OK && h[1].OK {
				t.Errorf("Headers() = %+v, want one copy flagged", h)
			}
			// cryptsetup picks the same copy keygate does. (It also repairs
			// the other copy, as it opens the image read-write.)
			_, csErr := cryptsetupErr(t, "open", "--test-passphrase", "--key-file", writeKeyFile(t, pass1), img)
			if (csErr == nil) != c.newSlot {
				t.Errorf("cryptsetup with the new key: %v, want visible=%v", csErr, c.newSlot)
			}
			if err := v.SetToken(1, luks2.Token{Type: "x"}); err != nil {
				t.Fatal(err)
			}
			if h := openVol(t, img).Headers(); !h[0].OK || !h[1].OK {
				t.Errorf("not repaired: %+v", h)
			}
		})
	}
}

func TestTruncatedImage(t *testing.T) {
	img, _ := format(t, []byte("pw"), luks2.FormatOptions{})
	for _, c := range []struct {
		name string
		size int64
		is   error
	}{
		{"empty", 0, luks2.ErrTruncated},
		{"inside binary header", 100, luks2.ErrTruncated},
		{"inside primary json", 6000, luks2.ErrTruncated},
		{"inside secondary", 20000, luks2.ErrTruncated},
		{"inside keyslots area", 1 << 20, luks2.ErrTruncated},
		{"one byte short of data offset", luks2.DataOffset - 1, luks2.ErrTruncated},
	} {
		t.Run(c.name, func(t *testing.T) {
			short := newImage(t, 0)
			b, _ := os.ReadFile(img)
			if err := os.WriteFile(short, b[:c.size], 0o600); err != nil {
				t.Fatal(err)
			}
			_, err := luks2.Open(openRW(t, short))
			if !errors.Is(err, c.is) {
				t.Fatalf("Open = %v, want %v", err, c.is)
			}
			if c.size > 0 && !strings.Contains(err.Error(), "restore it from a copy") {
				t.Errorf("error does not say what to do: %v", err)
			}
		})
	}
	for _, size := range []int64{10000, imageSize} {
		t.Run(fmt.Sprintf("not LUKS at all/%d bytes", size), func(t *testing.T) {
			_, err := luks2.Open(openRW(t, newImage(t, size)))
			if !errors.Is(err, luks2.ErrNotLUKS2) || errors.Is(err, luks2.ErrCorruptHeader) {
				t.Fatalf("Open = %v, want ErrNotLUKS2 only", err)
			}
		})
	}
	for _, c := range []struct {
		name   string
		size   int64
		sector int
	}{
		{"format too small", luks2.DataOffset, 512},
		{"format unaligned payload", luks2.DataOffset + 4096 + 512, 4096},
	} {
		t.Run(c.name, func(t *testing.T) {
			_, _, err := luks2.Format(openRW(t, newImage(t, c.size)), []byte("pw"), luks2.FormatOptions{SectorSize: c.sector, PBKDF: cheapPBKDF2})
			if err == nil {
				t.Fatal("Format succeeded")
			}
		})
	}
}

func TestRemoveLastKeyslot(t *testing.T) {
	t.Parallel()
	pass := []byte("only")
	img, vk := format(t, pass, luks2.FormatOptions{})
	v := openVol(t, img)
	before := fileHash(t, img)
	if err := v.RemoveKeyslot(0, false); !errors.Is(err, luks2.ErrLastKeyslot) {
		t.Fatalf("RemoveKeyslot(last) = %v, want ErrLastKeyslot", err)
	}
	if fileHash(t, img) != before {
		t.Fatal("refused removal changed the image")
	}
	if err := v.RemoveKeyslot(0, true); err != nil {
		t.Fatalf("forced RemoveKeyslot: %v", err)
	}
	v = openVol(t, img)
	if _, _, err := v.Unlock(pass); !errors.Is(err, luks2.ErrWrongKey) {
		t.Fatalf("Unlock after erase = %v", err)
	}
	// The digest survives, so whoever holds the volume key can re-enrol.
	slot, err := v.AddKeyslot(lockedKey(vk), []byte("again"), cheapPBKDF2)
	if err != nil || slot != 0 {
		t.Fatalf("AddKeyslot = %d, %v", slot, err)
	}
	cryptsetup(t, "open", "--test-passphrase", "--key-file", writeKeyFile(t, []byte("again")), img)
}

func TestKeygateToken(t *testing.T) {
	good := luks2.KeygateToken{Keyslot: 0, URL: "https://ks.example", VolumeID: "v", CASHA256: strings.Repeat("a1", 32)}
	for _, c := range []struct {
		name string
		mod  func(*luks2.KeygateToken)
		ok   bool
	}{
		{"valid", func(*luks2.KeygateToken) {}, true},
		{"http url", func(k *luks2.KeygateToken) { k.URL = "http://ks.example" }, false},
		{"empty volume", func(k *luks2.KeygateToken) { k.VolumeID = "" }, false},
		{"short fingerprint", func(k *luks2.KeygateToken) { k.CASHA256 = "abcd" }, false},
		{"uppercase fingerprint", func(k *luks2.KeygateToken) { k.CASHA256 = strings.Repeat("A1", 32) }, false},
		{"replicas", func(k *luks2.KeygateToken) { k.MoreURLs = []string{"https://ks2.example:8443", "https://ks3.example"} }, true},
		{"http replica", func(k *luks2.KeygateToken) { k.MoreURLs = []string{"http://ks2.example"} }, false},
		{"replica listed twice", func(k *luks2.KeygateToken) { k.MoreURLs = []string{"https://ks.example"} }, false},
		{"comma in url", func(k *luks2.KeygateToken) { k.URL = "https://a.example,https://b.example" }, false},
	} {
		t.Run(c.name, func(t *testing.T) {
			k := good
			c.mod(&k)
			tok, err := k.Token()
			if (err == nil) != c.ok {
				t.Fatalf("Token() err = %v, want ok=%v", err, c.ok)
			}
			if c.ok {
				back, err := luks2.ParseKeygateToken(tok)
				if err != nil || !reflect.DeepEqual(back, k) {
					t.Fatalf("round trip = %+v, %v", back, err)
				}
				// One URL is written as before keygate_urls existed, so
				// that older readers and older images agree.
				if _, has := tok.Fields["keygate_urls"]; has != (len(k.MoreURLs) > 0) {
					t.Fatalf("keygate_urls present = %v with %d more URLs", has, len(k.MoreURLs))
				}
			}
		})
	}
	t.Run("parse", func(t *testing.T) {
		base := `"keygate_url":"https://a.example","keygate_volume":"v","keygate_ca_sha256":"` + strings.Repeat("a1", 32) + `"`
		for _, c := range []struct {
			name, extra string
			want        []string // nil: refused
		}{
			{"single url, as older images", ``, []string{"https://a.example"}},
			{"list", `,"keygate_urls":["https://a.example","https://b.example"]`, []string{"https://a.example", "https://b.example"}},
			{"list of one", `,"keygate_urls":["https://a.example"]`, []string{"https://a.example"}},
			{"list not starting with keygate_url", `,"keygate_urls":["https://b.example","https://a.example"]`, nil},
			{"empty list", `,"keygate_urls":[]`, nil},
			{"not a list", `,"keygate_urls":"https://a.example"`, nil},
			{"http in list", `,"keygate_urls":["https://a.example","http://b.example"]`, nil},
		} {
			t.Run(c.name, func(t *testing.T) {
				tok := luks2.Token{Type: "keygate", Keyslots: []int{0}}
				if err := json.Unmarshal([]byte(`{`+base+c.extra+`}`), &tok.Fields); err != nil {
					t.Fatal(err)
				}
				k, err := luks2.ParseKeygateToken(tok)
				if c.want == nil {
					if err == nil {
						t.Fatalf("accepted: %+v", k)
					}
					return
				}
				if err != nil || !reflect.DeepEqual(k.URLs(), c.want) {
					t.Fatalf("URLs() = %v, %v; want %v", k.URLs(), err, c.want)
				}
			})
		}
	})
	t.Run("keyslot must exist", func(t *testing.T) {
		img, _ := format(t, []byte("pw"), luks2.FormatOptions{})
		k := good
		k.Keyslot = 3
		tok, _ := k.Token()
		if err := openVol(t, img).SetToken(0, tok); err == nil {
			t.Fatal("SetToken accepted a token naming a missing keyslot")
		}
	})
}

func TestInfoHoldsNoSecret(t *testing.T) {
	img, vk := format(t, []byte("pw"), luks2.FormatOptions{Label: "lbl", SectorSize: 4096})
	in := openVol(t, img).Info()
	if in.UUID == "" || in.Label != "lbl" || in.SeqID != 1 || in.Segment == nil || in.Segment.SectorSize != 4096 ||
		in.Segment.Offset != luks2.DataOffset || in.MetadataSize != luks2.MetadataSize || in.KeyslotsSize != luks2.KeyslotsSize {
		t.Fatalf("Info() = %+v", in)
	}
	if s := strings.ToLower(string(mustJSON(t, in))); strings.Contains(s, "salt") || strings.Contains(s, "digest") || bytes.Contains([]byte(s), vk) {
		t.Fatalf("Info JSON carries salts, digests or key bytes: %s", s)
	}
}
