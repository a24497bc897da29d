//go:build cgo

package hsm_test

import (
	"bytes"
	"errors"
	"testing"

	"github.com/miekg/pkcs11"

	"github.com/keygate/keygate/internal/testutil"
	"github.com/keygate/keygate/keysvc/masterkey"
	"github.com/keygate/keygate/keysvc/masterkey/hsm"
)

const pin = "1234"

func cfg(t *testing.T, module, uri, pin string) hsm.Config {
	t.Helper()
	u, err := hsm.ParseURI(uri)
	if err != nil {
		t.Fatal(err)
	}
	return hsm.Config{Module: module, URI: u, PIN: []byte(pin)}
}

func open(t *testing.T, c hsm.Config) *hsm.Token {
	t.Helper()
	tok, err := hsm.Open(c)
	if err != nil {
		t.Fatalf("open: %v", err)
	}
	t.Cleanup(tok.Close)
	return tok
}

// TestKeyInToken: a missing object is created, non-extractable; sealing,
// opening and deriving work in the token and give the same results after
// the token is closed and opened again (a restart).
func TestKeyInToken(t *testing.T) {
	module := testutil.SoftHSM(t, "kg", pin)
	c := cfg(t, module, "pkcs11:token=kg;object=master", pin)
	tok := open(t, c)
	k, created, err := tok.LoadOrCreate(tok.Label())
	if err != nil || !created {
		t.Fatalf("LoadOrCreate: created=%v %v, want a new key", created, err)
	}
	uk := bytes.Repeat([]byte{7}, 32)
	sealed, err := k.Seal("vol-1", uk)
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(sealed, uk) {
		t.Fatal("sealed blob holds the plaintext")
	}
	got, err := k.Open("vol-1", sealed)
	if err != nil || !bytes.Equal(got.Bytes(), uk) {
		t.Fatalf("open: %v", err)
	}
	got.Destroy()
	for name, tc := range map[string]struct {
		id   string
		blob []byte
	}{
		"other record": {"vol-2", sealed},
		"flipped byte": {"vol-1", append(bytes.Clone(sealed[:len(sealed)-1]), sealed[len(sealed)-1]^1)},
		"truncated":    {"vol-1", sealed[:20]},
		"file format":  {"vol-1", append([]byte{1}, sealed[1:]...)},
	} {
		if _, err := k.Open(tc.id, tc.blob); !errors.Is(err, masterkey.ErrOpen) {
			t.Errorf("%s: %v, want ErrOpen", name, err)
		}
	}
	d1, err := k.Derive("a")
	if err != nil {
		t.Fatal(err)
	}
	d2, _ := k.Derive("b")
	if len(d1.Bytes()) != masterkey.Size || bytes.Equal(d1.Bytes(), d2.Bytes()) {
		t.Fatal("sub-keys for two labels are equal or short")
	}
	fp, err := masterkey.Fingerprint(k)
	if err != nil || len(fp) != 32 {
		t.Fatalf("fingerprint %q %v", fp, err)
	}
	tok.Close()

	tok = open(t, c)
	k, created, err = tok.LoadOrCreate(tok.Label())
	if err != nil || created {
		t.Fatalf("second LoadOrCreate: created=%v %v, want the same key", created, err)
	}
	got, err = k.Open("vol-1", sealed)
	if err != nil || !bytes.Equal(got.Bytes(), uk) {
		t.Fatalf("open after restart: %v", err)
	}
	d1b, _ := k.Derive("a")
	if !bytes.Equal(d1.Bytes(), d1b.Bytes()) {
		t.Fatal("derived sub-key changed across a restart")
	}
	if fp2, _ := masterkey.Fingerprint(k); fp2 != fp {
		t.Fatalf("fingerprint %s then %s", fp, fp2)
	}
}

func TestOpenRefusals(t *testing.T) {
	module := testutil.SoftHSM(t, "kg", pin)
	for _, tc := range []struct {
		name, uri, pin, module string
		want                   error
	}{
		{"wrong PIN", "pkcs11:token=kg;object=m", "9999", module, hsm.ErrPIN},
		{"no such token", "pkcs11:token=other;object=m", pin, module, hsm.ErrToken},
		{"serial mismatch", "pkcs11:token=kg;object=m;serial=nope", pin, module, hsm.ErrToken},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tok, err := hsm.Open(cfg(t, tc.module, tc.uri, tc.pin))
			if err == nil {
				tok.Close()
			}
			if !errors.Is(err, tc.want) {
				t.Fatalf("got %v, want %v", err, tc.want)
			}
		})
	}
	if _, err := hsm.Open(cfg(t, "/nonexistent/lib.so", "pkcs11:token=kg;object=m", pin)); err == nil {
		t.Fatal("a missing module was accepted")
	}
}

// raw runs fn in a logged-in session on the token, through the module
// directly, as an operator's own tool would (no Token may be open).
func raw(t *testing.T, module, token string, fn func(ctx *pkcs11.Ctx, sh pkcs11.SessionHandle)) {
	t.Helper()
	ctx := pkcs11.New(module)
	if err := ctx.Initialize(); err != nil {
		t.Fatal(err)
	}
	defer func() { ctx.Finalize(); ctx.Destroy() }()
	slots, _ := ctx.GetSlotList(true)
	for _, s := range slots {
		ti, _ := ctx.GetTokenInfo(s)
		if ti.Label != token {
			continue
		}
		sh, err := ctx.OpenSession(s, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
		if err != nil {
			t.Fatal(err)
		}
		defer ctx.CloseSession(sh)
		if err := ctx.Login(sh, pkcs11.CKU_USER, pin); err != nil {
			t.Fatal(err)
		}
		fn(ctx, sh)
		return
	}
	t.Fatalf("no token %q", token)
}

// generate makes a key object with the given attributes.
func generate(t *testing.T, module, token string, mech uint, attrs ...*pkcs11.Attribute) {
	t.Helper()
	raw(t, module, token, func(ctx *pkcs11.Ctx, sh pkcs11.SessionHandle) {
		if _, err := ctx.GenerateKey(sh, []*pkcs11.Mechanism{pkcs11.NewMechanism(mech, nil)}, attrs); err != nil {
			t.Fatal(err)
		}
	})
}

// TestUnusableKeyRefused: key objects that could leave the token, or are
// not AES-256, are refused by name, and not replaced.
func TestUnusableKeyRefused(t *testing.T) {
	module := testutil.SoftHSM(t, "kg", pin)
	aes := func(label string, n int, extractable, sensitive bool) {
		generate(t, module, "kg", pkcs11.CKM_AES_KEY_GEN,
			pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY), pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_AES),
			pkcs11.NewAttribute(pkcs11.CKA_VALUE_LEN, n), pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
			pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true), pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, extractable),
			pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, sensitive), pkcs11.NewAttribute(pkcs11.CKA_LABEL, label))
	}
	aes("extractable", 32, true, true)
	aes("readable", 32, false, false)
	aes("aes128", 16, false, true)
	generate(t, module, "kg", pkcs11.CKM_GENERIC_SECRET_KEY_GEN,
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY), pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_GENERIC_SECRET),
		pkcs11.NewAttribute(pkcs11.CKA_VALUE_LEN, 32), pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
		pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, false), pkcs11.NewAttribute(pkcs11.CKA_LABEL, "generic"))
	for label, want := range map[string]string{
		"extractable": "is extractable", "readable": "is not sensitive", "aes128": "not AES-256", "generic": "is not an AES key",
	} {
		t.Run(label, func(t *testing.T) {
			tok := open(t, cfg(t, module, "pkcs11:token=kg;object="+label, pin))
			_, _, err := tok.LoadOrCreate(tok.Label())
			if !errors.Is(err, hsm.ErrKeyObject) || !bytes.Contains([]byte(err.Error()), []byte(want)) {
				t.Fatalf("got %v, want ErrKeyObject saying %q", err, want)
			}
			tok.Close()
		})
	}
}

// TestInstall: the token side of rotation. CreateNext makes a second key,
// Install destroys the old one and gives the new one the plain label, and
// running Install again (after a crash) changes nothing.
func TestInstall(t *testing.T) {
	module := testutil.SoftHSM(t, "kg", pin)
	tok := open(t, cfg(t, module, "pkcs11:token=kg;object=master", pin))
	old, _, err := tok.LoadOrCreate("master")
	if err != nil {
		t.Fatal(err)
	}
	oldFP, _ := masterkey.Fingerprint(old)
	next, err := tok.CreateNext()
	if err != nil {
		t.Fatal(err)
	}
	nextFP, _ := masterkey.Fingerprint(next)
	if nextFP == oldFP {
		t.Fatal("the next key is the old one")
	}
	if again, err := tok.CreateNext(); err != nil || mustFP(t, again) != nextFP {
		t.Fatalf("CreateNext again: %v, want the same next key", err)
	}
	// While the next key exists, a missing current key is not re-created.
	for range 2 {
		if err := tok.Install(); err != nil {
			t.Fatalf("install: %v", err)
		}
	}
	cur, created, err := tok.LoadOrCreate("master")
	if err != nil || created || mustFP(t, cur) != nextFP {
		t.Fatalf("after install: created=%v %v, want the next key under the plain label", created, err)
	}
	if _, err := tok.FindNext(); !errors.Is(err, hsm.ErrNotFound) {
		t.Fatalf("next key still there: %v", err)
	}
}

func mustFP(t *testing.T, m masterkey.Master) string {
	t.Helper()
	fp, err := masterkey.Fingerprint(m)
	if err != nil {
		t.Fatal(err)
	}
	return fp
}

// TestInterruptedInstall: a token left with only the next key (the old
// one destroyed, the relabel not done) is not given a fresh key by
// LoadOrCreate, which would lose every row; Install finishes the step.
func TestInterruptedInstall(t *testing.T) {
	module := testutil.SoftHSM(t, "kg", pin)
	c := cfg(t, module, "pkcs11:token=kg;object=master", pin)
	tok := open(t, c)
	if _, _, err := tok.LoadOrCreate("master"); err != nil {
		t.Fatal(err)
	}
	next, err := tok.CreateNext()
	if err != nil {
		t.Fatal(err)
	}
	nextFP := mustFP(t, next)
	tok.Close()
	raw(t, module, "kg", func(ctx *pkcs11.Ctx, sh pkcs11.SessionHandle) {
		ctx.FindObjectsInit(sh, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_LABEL, "master")})
		objs, _, _ := ctx.FindObjects(sh, 1)
		ctx.FindObjectsFinal(sh)
		if len(objs) != 1 || ctx.DestroyObject(sh, objs[0]) != nil {
			t.Fatal("cannot destroy the old key")
		}
	})
	tok = open(t, c)
	if _, _, err := tok.LoadOrCreate("master"); !errors.Is(err, hsm.ErrKeyObject) || !bytes.Contains([]byte(err.Error()), []byte("interrupted")) {
		t.Fatalf("LoadOrCreate with only the next key: %v, want a refusal naming the interrupted rotation", err)
	}
	if err := tok.Install(); err != nil {
		t.Fatal(err)
	}
	cur, created, err := tok.LoadOrCreate("master")
	if err != nil || created || mustFP(t, cur) != nextFP {
		t.Fatalf("after install: created=%v %v", created, err)
	}
}
