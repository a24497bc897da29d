package luks2_test

import (
	"bytes"
	"fmt"
	"strings"
	"testing"

	"github.com/keygate/keygate/disk/luks2"
)

// TestKeygateToCryptsetup: an image keygate formats passes luksDump, opens
// with --test-passphrase, and cryptsetup finds the same volume key.
func TestKeygateToCryptsetup(t *testing.T) {
	type tc struct {
		p       luks2.PBKDF
		sector  int
		keySize int
	}
	cases := []tc{{cheapPBKDF2, 512, 32}}
	for _, sector := range []int{512, 4096} {
		for _, p := range []luks2.PBKDF{cheapPBKDF2, cheapArgon2id} {
			cases = append(cases, tc{p, sector, 64})
		}
	}
	for _, c := range cases {
		p, sector := c.p, c.sector
		{
			t.Run(fmt.Sprintf("%s/sector%d/key%d", p.Type, sector, c.keySize), func(t *testing.T) {
				t.Parallel()
				pass := []byte("correct horse\nbattery staple\x00")
				img, vk := format(t, pass, luks2.FormatOptions{SectorSize: sector, PBKDF: p, Label: "kg-test", KeySize: c.keySize})
				kf := writeKeyFile(t, pass)
				dump := cryptsetup(t, "luksDump", img)
				for _, want := range []string{"\tkg-test\n", fmt.Sprintf("sector: %d [bytes]", sector), "PBKDF:      " + p.Type, "offset: 16777216 [bytes]"} {
					if !strings.Contains(dump, want) {
						t.Errorf("luksDump lacks %q:\n%s", want, dump)
					}
				}
				cryptsetup(t, "open", "--test-passphrase", "--key-file", kf, img)
				if got := dumpVolumeKey(t, img, kf); !bytes.Equal(got, vk) {
					t.Fatalf("cryptsetup's volume key differs from the one Format returned")
				}
			})
		}
	}
}

// TestCryptsetupToKeygate: an image cryptsetup formats opens in keygate
// with the same key file and yields cryptsetup's volume key.
func TestCryptsetupToKeygate(t *testing.T) {
	for _, sector := range []int{512, 4096} {
		for _, p := range []luks2.PBKDF{cheapPBKDF2, cheapArgon2id} {
			t.Run(fmt.Sprintf("%s/sector%d", p.Type, sector), func(t *testing.T) {
				t.Parallel()
				img := newImage(t, imageSize)
				pass := []byte("from cryptsetup")
				kf := writeKeyFile(t, pass)
				args := append([]string{"luksFormat", "--type", "luks2", "--batch-mode", "--sector-size", fmt.Sprint(sector), "--label", "cs"}, csArgs(p)...)
				cryptsetup(t, append(args, img, kf)...)
				want := dumpVolumeKey(t, img, kf)

				v, err := luks2.Open(openRW(t, img))
				if err != nil {
					t.Fatalf("Open: %v", err)
				}
				got, slot := unlock(t, v, pass)
				if !bytes.Equal(got, want) || slot != 0 {
					t.Fatalf("slot %d: volume key differs from cryptsetup's", slot)
				}
				off, ss, cipher := v.Segment()
				if off != luks2.DataOffset || ss != sector || cipher != "aes-xts-plain64" {
					t.Errorf("Segment() = %d, %d, %q", off, ss, cipher)
				}
				in := v.Info()
				if in.Label != "cs" || len(in.Keyslots) != 1 || in.Keyslots[0].PBKDF.Type != p.Type || !in.Headers[0].OK || !in.Headers[1].OK {
					t.Errorf("Info() = %+v", in)
				}
			})
		}
	}
}

// TestKeygateUpdatesAcceptedByCryptsetup: after AddKeyslot, SetToken (a
// keygate token) and RemoveKeyslot, cryptsetup still accepts the image and
// exactly the remaining keys open it.
func TestKeygateUpdatesAcceptedByCryptsetup(t *testing.T) {
	t.Parallel()
	pass0, pass1, pass2 := []byte("zero"), []byte("one"), []byte("two")
	img, vk := format(t, pass0, luks2.FormatOptions{})
	f := openRW(t, img)
	v, err := luks2.Open(f)
	if err != nil {
		t.Fatal(err)
	}
	for i, c := range []struct {
		pass []byte
		p    luks2.PBKDF
	}{{pass1, cheapArgon2id}, {pass2, luks2.KeyPBKDF()}} {
		slot, err := v.AddKeyslot(lockedKey(vk), c.pass, c.p)
		if err != nil || slot != i+1 {
			t.Fatalf("AddKeyslot = %d, %v", slot, err)
		}
	}
	kt := luks2.KeygateToken{Keyslot: 1, URL: "https://keys.example:8443", VolumeID: "vol-1", CASHA256: strings.Repeat("ab", 32)}
	tok, err := kt.Token()
	if err != nil {
		t.Fatal(err)
	}
	if err := v.SetToken(0, tok); err != nil {
		t.Fatalf("SetToken: %v", err)
	}
	dump := cryptsetup(t, "luksDump", img)
	if !strings.Contains(dump, "0: keygate") {
		t.Errorf("luksDump does not show the keygate token:\n%s", dump)
	}
	exported := cryptsetup(t, "token", "export", "--token-id", "0", img)
	for _, want := range []string{`"type":"keygate"`, `"keyslots":["1"]`, `"keygate_url":"https://keys.example:8443"`, `"keygate_volume":"vol-1"`} {
		if !strings.Contains(exported, want) {
			t.Errorf("token export lacks %s: %s", want, exported)
		}
	}
	for slot, pass := range [][]byte{pass0, pass1, pass2} {
		kf := writeKeyFile(t, pass)
		cryptsetup(t, "open", "--test-passphrase", "--key-slot", fmt.Sprint(slot), "--key-file", kf, img)
		if got := dumpVolumeKey(t, img, kf); !bytes.Equal(got, vk) {
			t.Fatalf("slot %d: volume key differs", slot)
		}
	}
	if err := v.RemoveKeyslot(1, false); err != nil {
		t.Fatalf("RemoveKeyslot: %v", err)
	}
	if out, err := cryptsetupErr(t, "open", "--test-passphrase", "--key-file", writeKeyFile(t, pass1), img); err == nil {
		t.Fatalf("removed key still opens:\n%s", out)
	}
	for _, pass := range [][]byte{pass0, pass2} {
		cryptsetup(t, "open", "--test-passphrase", "--key-file", writeKeyFile(t, pass), img)
	}
	exported = cryptsetup(t, "token", "export", "--token-id", "0", img)
	if !strings.Contains(exported, `"keyslots":[]`) {
		t.Errorf("token still names the removed keyslot: %s", exported)
	}
}

// TestCryptsetupKeyslotsAndTokens: keyslots added by luksAddKey and tokens
// imported by cryptsetup are read, and survive a keygate rewrite.
func TestCryptsetupKeyslotsAndTokens(t *testing.T) {
	t.Parallel()
	img := newImage(t, imageSize)
	pass0, pass1 := []byte("first"), []byte("second")
	kf0, kf1 := writeKeyFile(t, pass0), writeKeyFile(t, pass1)
	cryptsetup(t, append(append([]string{"luksFormat", "--type", "luks2", "--batch-mode"}, csArgs(cheapPBKDF2)...), img, kf0)...)
	cryptsetup(t, append(append([]string{"luksAddKey", "--batch-mode", "--key-file", kf0}, csArgs(cheapArgon2id)...), img, kf1)...)
	foreign := writeKeyFile(t, []byte(`{"type":"acme-hsm","keyslots":["0"],"acme_nested":{"a":[1,2,{"b":null}]},"acme_n":12345678901234}`))
	cryptsetup(t, "token", "import", "--token-id", "3", "--json-file", foreign, img)
	kg := writeKeyFile(t, []byte(`{"type":"keygate","keyslots":["1"],"keygate_url":"https://k.example","keygate_volume":"v9","keygate_ca_sha256":"`+strings.Repeat("0f", 32)+`"}`))
	cryptsetup(t, "token", "import", "--token-id", "5", "--json-file", kg, img)
	want := dumpVolumeKey(t, img, kf0)

	v, err := luks2.Open(openRW(t, img))
	if err != nil {
		t.Fatal(err)
	}
	for slot, pass := range [][]byte{pass0, pass1} {
		vk, err := v.UnlockSlot(slot, pass)
		if err != nil {
			t.Fatalf("UnlockSlot(%d): %v", slot, err)
		}
		if !bytes.Equal(vk.Bytes(), want) {
			t.Fatalf("slot %d: wrong volume key", slot)
		}
		vk.Destroy()
	}
	toks := v.Tokens()
	if toks[3].Type != "acme-hsm" || string(toks[3].Fields["acme_n"]) != "12345678901234" {
		t.Errorf("foreign token read as %+v", toks[3])
	}
	id, k, err := v.FindKeygateToken()
	if err != nil || id != 5 || k.Keyslot != 1 || k.VolumeID != "v9" {
		t.Fatalf("FindKeygateToken = %d, %+v, %v", id, k, err)
	}
	if _, slot, err := v.UnlockToken(5, pass1); err != nil || slot != 1 {
		t.Fatalf("UnlockToken = %d, %v", slot, err)
	}
	// A keygate rewrite keeps the foreign token byte-for-byte in meaning.
	if err := v.RemoveToken(5); err != nil {
		t.Fatal(err)
	}
	out := cryptsetup(t, "token", "export", "--token-id", "3", img)
	for _, w := range []string{`"acme_nested":{"a":[1,2,{"b":null}]}`, `"acme_n":12345678901234`, `"keyslots":["0"]`} {
		if !strings.Contains(out, w) {
			t.Errorf("foreign token lost %s after rewrite: %s", w, out)
		}
	}
	cryptsetup(t, "open", "--test-passphrase", "--key-file", kf1, img)
}

// TestCryptsetupUpdatesKeygateVolume: cryptsetup can add keyslots, tokens
// and priorities to a keygate volume, and keygate honours them: a
// "prefer" slot is tried first and an "ignore" slot only when named
// (UnlockSlot, or a token naming it).
func TestCryptsetupUpdatesKeygateVolume(t *testing.T) {
	t.Parallel()
	pass := []byte("shared passphrase")
	img, vk := format(t, pass, luks2.FormatOptions{SectorSize: 4096})
	kf := writeKeyFile(t, pass)
	v := openVol(t, img)
	kt, _ := luks2.KeygateToken{Keyslot: 0, URL: "https://k.example", VolumeID: "v", CASHA256: strings.Repeat("cd", 32)}.Token()
	if err := v.SetToken(2, kt); err != nil {
		t.Fatal(err)
	}
	cryptsetup(t, append(append([]string{"luksAddKey", "--batch-mode", "--key-file", kf}, csArgs(cheapPBKDF2)...), img, kf)...)
	cryptsetup(t, append(append([]string{"luksAddKey", "--batch-mode", "--key-file", kf}, csArgs(cheapPBKDF2)...), img, kf)...)
	cryptsetup(t, "config", "--priority", "prefer", "--key-slot", "2", img)
	cryptsetup(t, "config", "--priority", "ignore", "--key-slot", "0", img)

	v = openVol(t, img)
	got, slot := unlock(t, v, pass)
	if slot != 2 || !bytes.Equal(got, vk) {
		t.Fatalf("Unlock opened slot %d, want the preferred slot 2", slot)
	}
	ks := v.Keyslots()
	if len(ks) != 3 || ks[0].Priority != "ignore" || ks[1].Priority != "normal" || ks[2].Priority != "high" {
		t.Fatalf("Keyslots() = %+v", ks)
	}
	// A token names its keyslots explicitly, so priority does not apply
	// (as with cryptsetup's --token-id).
	if vk0, slot, err := v.UnlockToken(2, pass); err != nil || slot != 0 {
		t.Fatalf("UnlockToken = %d, %v", slot, err)
	} else {
		vk0.Destroy()
	}
	if vk0, err := v.UnlockSlot(0, pass); err != nil {
		t.Fatalf("UnlockSlot(0) of an ignore-priority slot: %v", err)
	} else {
		vk0.Destroy()
	}
	if _, k, err := v.FindKeygateToken(); err != nil || k.Keyslot != 0 {
		t.Fatalf("keygate token after cryptsetup updates: %+v, %v", k, err)
	}
}
