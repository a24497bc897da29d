//go:build cgo

package hsm

import (
	"bytes"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"strings"
	"sync"

	"github.com/awnumar/memguard"
	"github.com/miekg/pkcs11"

	"github.com/keygate/keygate/keysvc/masterkey"
)

// sessions is how many PKCS#11 sessions a Token keeps open: a session
// runs one operation at a time, so this bounds how many seals, opens and
// derivations run at once.
const sessions = 4

// Token is a logged-in PKCS#11 token. It is safe for concurrent use.
// Close logs out and unloads the module.
type Token struct {
	ctx   *pkcs11.Ctx
	slot  uint
	uri   URI
	pool  chan pkcs11.SessionHandle
	mu    sync.Mutex
	close bool
}

// Open loads the module, finds the token the URI names, opens sessions
// and logs in.
func Open(cfg Config) (_ *Token, err error) {
	if cfg.Module == "" {
		cfg.Module = cfg.URI.ModulePath
	}
	if cfg.Module == "" {
		return nil, errors.New("pkcs11: no module: pass --pkcs11-module /path/to/libpkcs11.so (for SoftHSM2: /usr/lib/softhsm/libsofthsm2.so)")
	}
	if len(cfg.PIN) == 0 {
		return nil, errors.New("pkcs11: empty PIN: put the token's user PIN in a 0600 file and pass --pkcs11-pin-file")
	}
	ctx := pkcs11.New(cfg.Module)
	if ctx == nil {
		return nil, fmt.Errorf("pkcs11: cannot load module %s (is the path right, and the library built for this machine?)", cfg.Module)
	}
	if err := ctx.Initialize(); err != nil {
		ctx.Destroy()
		return nil, fmt.Errorf("pkcs11: initialise %s: %w", cfg.Module, err)
	}
	t := &Token{ctx: ctx, uri: cfg.URI, pool: make(chan pkcs11.SessionHandle, sessions)}
	defer func() {
		if err != nil {
			t.Close()
		}
	}()
	if t.slot, err = findSlot(ctx, cfg.URI); err != nil {
		return nil, err
	}
	for range sessions {
		sh, err := ctx.OpenSession(t.slot, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
		if err != nil {
			return nil, fmt.Errorf("pkcs11: open session on token %q: %w", cfg.URI.Token, err)
		}
		t.pool <- sh
	}
	sh := <-t.pool
	err = ctx.Login(sh, pkcs11.CKU_USER, string(cfg.PIN))
	t.pool <- sh
	var perr pkcs11.Error
	if errors.As(err, &perr) {
		switch perr {
		case pkcs11.CKR_USER_ALREADY_LOGGED_IN:
			err = nil
		case pkcs11.CKR_PIN_INCORRECT, pkcs11.CKR_PIN_INVALID, pkcs11.CKR_PIN_LEN_RANGE:
			return nil, fmt.Errorf("pkcs11: token %q: %w (check the file given to --pkcs11-pin-file; repeated wrong PINs lock the token)", cfg.URI.Token, ErrPIN)
		case pkcs11.CKR_PIN_LOCKED:
			return nil, fmt.Errorf("pkcs11: token %q: %w: the PIN is locked after too many wrong tries (unlock it with the SO PIN)", cfg.URI.Token, ErrPIN)
		}
	}
	if err != nil {
		return nil, fmt.Errorf("pkcs11: log in to token %q: %w", cfg.URI.Token, err)
	}
	return t, nil
}

func findSlot(ctx *pkcs11.Ctx, u URI) (uint, error) {
	slots, err := ctx.GetSlotList(true)
	if err != nil {
		return 0, fmt.Errorf("pkcs11: list slots: %w", err)
	}
	var found []uint
	var labels []string
	for _, s := range slots {
		ti, err := ctx.GetTokenInfo(s)
		if err != nil {
			continue
		}
		// Token info fields are blank-padded to fixed widths.
		label := strings.TrimRight(ti.Label, " \x00")
		labels = append(labels, label)
		if label != u.Token ||
			u.Serial != "" && strings.TrimRight(ti.SerialNumber, " \x00") != u.Serial ||
			u.Manufacturer != "" && strings.TrimRight(ti.ManufacturerID, " \x00") != u.Manufacturer ||
			u.Model != "" && strings.TrimRight(ti.Model, " \x00") != u.Model {
			continue
		}
		found = append(found, s)
	}
	switch len(found) {
	case 0:
		return 0, fmt.Errorf("pkcs11: %w token=%q (tokens present: %q; initialise one, e.g. softhsm2-util --init-token --free --label %s)", ErrToken, u.Token, labels, u.Token)
	case 1:
		return found[0], nil
	}
	return 0, fmt.Errorf("pkcs11: %d tokens are labelled %q: add serial= to the URI to pick one", len(found), u.Token)
}

// Close logs out, closes the sessions and unloads the module. Keys from
// this token must not be used after.
func (t *Token) Close() {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.close {
		return
	}
	t.close = true
	for len(t.pool) > 0 {
		sh := <-t.pool
		t.ctx.Logout(sh) // the first one logs out the application; later ones fail harmlessly
		t.ctx.CloseSession(sh)
	}
	t.ctx.Finalize()
	t.ctx.Destroy()
}

// with runs fn on a session of its own.
func (t *Token) with(fn func(sh pkcs11.SessionHandle) error) error {
	sh := <-t.pool
	defer func() { t.pool <- sh }()
	return fn(sh)
}

// Label is the URI's object label: the current master key's.
func (t *Token) Label() string { return t.uri.Object }

// LoadOrCreate finds the key object labelled label, or generates one if
// there is none; created reports which. A found object is checked
// (checkKey). Generation refuses to run while an object labelled
// label+NextSuffix exists: that is a rotation whose last step was cut
// short, which Install completes.
func (t *Token) LoadOrCreate(label string) (k *Key, created bool, err error) {
	k, err = t.Find(label)
	if err == nil || !errors.Is(err, ErrNotFound) {
		return k, false, err
	}
	if _, nerr := t.Find(label + NextSuffix); nerr == nil {
		return nil, false, fmt.Errorf("pkcs11: %w: token %q holds %q but not %q: a master-key rotation was interrupted while installing its new key; start keysvc on the same database to complete it", ErrKeyObject, t.uri.Token, label+NextSuffix, label)
	}
	k, err = t.create(label)
	if err != nil {
		return nil, false, err
	}
	return k, true, nil
}

// Find returns the key object labelled label (and the URI's id, if any),
// checked; ErrNotFound if there is none.
func (t *Token) Find(label string) (*Key, error) {
	tmpl := []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, label),
	}
	if len(t.uri.ID) > 0 && label == t.uri.Object {
		tmpl = append(tmpl, pkcs11.NewAttribute(pkcs11.CKA_ID, t.uri.ID))
	}
	var objs []pkcs11.ObjectHandle
	err := t.with(func(sh pkcs11.SessionHandle) error {
		if err := t.ctx.FindObjectsInit(sh, tmpl); err != nil {
			return err
		}
		defer t.ctx.FindObjectsFinal(sh)
		var err error
		objs, _, err = t.ctx.FindObjects(sh, 2)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("pkcs11: find key %q: %w", label, err)
	}
	switch len(objs) {
	case 0:
		if t.other(label) {
			return nil, fmt.Errorf("pkcs11: %w: object %q on token %q is not a secret (AES) key; name another object", ErrKeyObject, label, t.uri.Token)
		}
		return nil, fmt.Errorf("pkcs11: %w: %q on token %q", ErrNotFound, label, t.uri.Token)
	case 2:
		return nil, fmt.Errorf("pkcs11: %w: two secret keys on token %q are labelled %q; add id= to the URI or relabel one", ErrKeyObject, t.uri.Token, label)
	}
	k := &Key{t: t, obj: objs[0], label: label}
	if err := k.check(); err != nil {
		return nil, err
	}
	return k, nil
}

// other reports whether an object that is not a secret key has the label.
func (t *Token) other(label string) bool {
	var n int
	t.with(func(sh pkcs11.SessionHandle) error {
		if err := t.ctx.FindObjectsInit(sh, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_LABEL, label)}); err != nil {
			return err
		}
		defer t.ctx.FindObjectsFinal(sh)
		objs, _, err := t.ctx.FindObjects(sh, 1)
		n = len(objs)
		return err
	})
	return n > 0
}

// create generates a non-extractable, sensitive AES-256 token key labelled
// label, usable only to encrypt, decrypt and sign (CMAC): not to wrap or
// to derive, so that no PKCS#11 call can move it out of the token.
func (t *Token) create(label string) (*Key, error) {
	id := t.uri.ID
	if len(id) == 0 || label != t.uri.Object {
		id = make([]byte, 16)
		rand.Read(id)
	}
	tmpl := []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_AES),
		pkcs11.NewAttribute(pkcs11.CKA_VALUE_LEN, masterkey.Size),
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
		pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true),
		pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, true),
		pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, false),
		pkcs11.NewAttribute(pkcs11.CKA_ENCRYPT, true),
		pkcs11.NewAttribute(pkcs11.CKA_DECRYPT, true),
		pkcs11.NewAttribute(pkcs11.CKA_SIGN, true),
		pkcs11.NewAttribute(pkcs11.CKA_VERIFY, true),
		pkcs11.NewAttribute(pkcs11.CKA_WRAP, false),
		pkcs11.NewAttribute(pkcs11.CKA_UNWRAP, false),
		pkcs11.NewAttribute(pkcs11.CKA_DERIVE, false),
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, label),
		pkcs11.NewAttribute(pkcs11.CKA_ID, id),
	}
	var obj pkcs11.ObjectHandle
	err := t.with(func(sh pkcs11.SessionHandle) error {
		var err error
		obj, err = t.ctx.GenerateKey(sh, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_KEY_GEN, nil)}, tmpl)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("pkcs11: generate AES-256 key %q on token %q: %w", label, t.uri.Token, err)
	}
	k := &Key{t: t, obj: obj, label: label}
	if err := k.check(); err != nil {
		return nil, err
	}
	return k, nil
}

// CreateNext generates the key a rotation moves to, labelled
// Label()+NextSuffix; if one is there already (a rotation resumed), it is
// returned instead.
func (t *Token) CreateNext() (*Key, error) {
	k, _, err := t.LoadOrCreate(t.uri.Object + NextSuffix)
	return k, err
}

// FindNext returns the key a rotation is moving to; ErrNotFound if none.
func (t *Token) FindNext() (*Key, error) { return t.Find(t.uri.Object + NextSuffix) }

// Install ends a rotation on the token: it destroys the object labelled
// Label() (the old master key, if still there) and relabels the
// Label()+NextSuffix object to Label(). Each step is safe to repeat: run
// again after a crash between them, it finishes what is left.
func (t *Token) Install() error {
	next, err := t.FindNext()
	if errors.Is(err, ErrNotFound) {
		if _, cur := t.Find(t.uri.Object); cur == nil {
			return nil // installed already
		}
	}
	if err != nil {
		return err
	}
	old, err := t.Find(t.uri.Object)
	switch {
	case err == nil:
		if err := t.with(func(sh pkcs11.SessionHandle) error { return t.ctx.DestroyObject(sh, old.obj) }); err != nil {
			return fmt.Errorf("pkcs11: destroy the old master key %q: %w", t.uri.Object, err)
		}
	case !errors.Is(err, ErrNotFound):
		return err
	}
	err = t.with(func(sh pkcs11.SessionHandle) error {
		return t.ctx.SetAttributeValue(sh, next.obj, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_LABEL, t.uri.Object)})
	})
	if err != nil {
		return fmt.Errorf("pkcs11: relabel %q to %q: %w", next.label, t.uri.Object, err)
	}
	return nil
}

// Key is an AES-256 key object in a token. It implements masterkey.Master.
type Key struct {
	t     *Token
	obj   pkcs11.ObjectHandle
	label string
}

var _ masterkey.Master = (*Key)(nil)

// check refuses a key object that could leave the token or is not an
// AES-256 key.
func (k *Key) check() error {
	var attrs []*pkcs11.Attribute
	err := k.t.with(func(sh pkcs11.SessionHandle) error {
		var err error
		attrs, err = k.t.ctx.GetAttributeValue(sh, k.obj, []*pkcs11.Attribute{
			pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, nil),
			pkcs11.NewAttribute(pkcs11.CKA_VALUE_LEN, nil),
			pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, nil),
			pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, nil),
			pkcs11.NewAttribute(pkcs11.CKA_TOKEN, nil),
		})
		return err
	})
	if err != nil {
		return fmt.Errorf("pkcs11: read attributes of key %q: %w", k.label, err)
	}
	bad := func(why string) error {
		return fmt.Errorf("pkcs11: %w: key %q on token %q %s; refusing it (generate a new key, or let keysvc create one under another object= label)", ErrKeyObject, k.label, k.t.uri.Token, why)
	}
	for _, a := range attrs {
		switch a.Type {
		case pkcs11.CKA_KEY_TYPE:
			if ulong(a.Value) != pkcs11.CKK_AES {
				return bad("is not an AES key")
			}
		case pkcs11.CKA_VALUE_LEN:
			if ulong(a.Value) != masterkey.Size {
				return bad(fmt.Sprintf("is %d bytes, not AES-256", ulong(a.Value)))
			}
		case pkcs11.CKA_EXTRACTABLE:
			if boolean(a.Value) {
				return bad("is extractable (CKA_EXTRACTABLE true): it could be exported from the token")
			}
		case pkcs11.CKA_SENSITIVE:
			if !boolean(a.Value) {
				return bad("is not sensitive (CKA_SENSITIVE false): its value could be read from the token")
			}
		case pkcs11.CKA_TOKEN:
			if !boolean(a.Value) {
				return bad("is a session object, not stored in the token")
			}
		}
	}
	return nil
}

// ulong decodes a CK_ULONG attribute (native byte order and width).
func ulong(b []byte) uint {
	switch len(b) {
	case 8:
		return uint(binary.NativeEndian.Uint64(b))
	case 4:
		return uint(binary.NativeEndian.Uint32(b))
	}
	return ^uint(0)
}

func boolean(b []byte) bool { return len(b) == 1 && b[0] != 0 }

// Destroy does nothing to the token: the key stays there, and the Token's
// Close ends the sessions.
func (k *Key) Destroy() {}

// sealVersion is the first byte of a blob sealed in the HSM:
//
//	0x02 || nonce (12 bytes, random) || AES-256-GCM ciphertext || tag (16)
//
// with additional data 0x02 || record ID, as masterkey's own version 1
// format (under the master key itself here, not a sub-key: there is no
// sub-key to hold outside the token). A file key's blob and an HSM key's
// do not open under each other.
const sealVersion = 2

const (
	nonceSize = 12
	tagSize   = 16
	overhead  = 1 + nonceSize + tagSize
)

func ad(recordID string) []byte { return append([]byte{sealVersion}, recordID...) }

func (k *Key) gcm(sh pkcs11.SessionHandle, nonce []byte, recordID string, encrypt bool) (free func(), err error) {
	p := pkcs11.NewGCMParams(nonce, ad(recordID), tagSize*8)
	m := []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_GCM, p)}
	if encrypt {
		err = k.t.ctx.EncryptInit(sh, m, k.obj)
	} else {
		err = k.t.ctx.DecryptInit(sh, m, k.obj)
	}
	return p.Free, err
}

// Seal encrypts plaintext inside the token under the record ID.
func (k *Key) Seal(recordID string, plaintext []byte) ([]byte, error) {
	if recordID == "" {
		return nil, errors.New("seal: empty record ID")
	}
	if len(plaintext) == 0 {
		return nil, errors.New("seal: empty plaintext")
	}
	out := make([]byte, 1+nonceSize, overhead+len(plaintext))
	out[0] = sealVersion
	if _, err := rand.Read(out[1:]); err != nil {
		return nil, fmt.Errorf("seal record %q: nonce: %w", recordID, err)
	}
	var ct []byte
	err := k.t.with(func(sh pkcs11.SessionHandle) error {
		free, err := k.gcm(sh, out[1:], recordID, true)
		defer free()
		if err != nil {
			return err
		}
		ct, err = k.t.ctx.Encrypt(sh, plaintext)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("seal record %q in the HSM: %w", recordID, err)
	}
	if len(ct) != len(plaintext)+tagSize {
		return nil, fmt.Errorf("seal record %q in the HSM: %d bytes of ciphertext for %d of plaintext", recordID, len(ct), len(plaintext))
	}
	return append(out, ct...), nil
}

// Open decrypts a blob made by Seal for the same record ID inside the
// token. The library hands the plaintext back in a Go slice: it is copied
// into a locked buffer and wiped at once. Any blob that does not
// authenticate is masterkey.ErrOpen.
func (k *Key) Open(recordID string, sealed []byte) (*memguard.LockedBuffer, error) {
	if len(sealed) <= overhead || sealed[0] != sealVersion {
		return nil, fmt.Errorf("open record %q: %w", recordID, masterkey.ErrOpen)
	}
	var (
		pt        []byte
		decrypted bool // DecryptInit passed: a failure now is the blob's
	)
	err := k.t.with(func(sh pkcs11.SessionHandle) error {
		free, err := k.gcm(sh, sealed[1:1+nonceSize], recordID, false)
		defer free()
		if err != nil {
			return err
		}
		decrypted = true
		pt, err = k.t.ctx.Decrypt(sh, sealed[1+nonceSize:])
		return err
	})
	if err != nil {
		clear(pt)
		// A tag mismatch is CKR_ENCRYPTED_DATA_INVALID by the standard;
		// SoftHSM2 answers CKR_GENERAL_ERROR, and others
		// CKR_FUNCTION_FAILED.
		var perr pkcs11.Error
		if decrypted && errors.As(err, &perr) && (perr == pkcs11.CKR_ENCRYPTED_DATA_INVALID || perr == pkcs11.CKR_ENCRYPTED_DATA_LEN_RANGE ||
			perr == pkcs11.CKR_FUNCTION_FAILED || perr == pkcs11.CKR_GENERAL_ERROR) {
			return nil, fmt.Errorf("open record %q: %w", recordID, masterkey.ErrOpen)
		}
		return nil, fmt.Errorf("open record %q in the HSM: %w", recordID, err)
	}
	if len(pt) != len(sealed)-overhead {
		clear(pt)
		return nil, fmt.Errorf("open record %q: %w", recordID, masterkey.ErrOpen)
	}
	return memguard.NewBufferFromBytes(pt), nil // wipes pt
}

// kdfContext is the SP 800-108 Context field of every derivation.
const kdfContext = "keygate master key"

// Derive returns the masterkey.Size-byte sub-key for label, computed in
// the token: NIST SP 800-108 KDF in counter mode with AES-CMAC as the PRF,
//
//	K(i) = CMAC(master, [i]_4 || label || 0x00 || "keygate master key" || [256]_4), i = 1, 2
//
// and the sub-key K(1) || K(2). The CMAC outputs pass through a Go slice
// and are wiped once copied into locked memory.
func (k *Key) Derive(label string) (*memguard.LockedBuffer, error) {
	if label == "" {
		return nil, errors.New("derive sub-key: empty label")
	}
	out := memguard.NewBuffer(masterkey.Size)
	for i := uint32(1); i <= masterkey.Size/16; i++ {
		var msg bytes.Buffer
		binary.Write(&msg, binary.BigEndian, i)
		msg.WriteString(label)
		msg.WriteByte(0)
		msg.WriteString(kdfContext)
		binary.Write(&msg, binary.BigEndian, uint32(masterkey.Size*8))
		var mac []byte
		err := k.t.with(func(sh pkcs11.SessionHandle) error {
			if err := k.t.ctx.SignInit(sh, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_CMAC, nil)}, k.obj); err != nil {
				return err
			}
			var err error
			mac, err = k.t.ctx.Sign(sh, msg.Bytes())
			return err
		})
		if err != nil || len(mac) != 16 {
			clear(mac)
			out.Destroy()
			if err == nil {
				err = fmt.Errorf("CMAC of %d bytes", len(mac))
			}
			return nil, fmt.Errorf("derive sub-key %q in the HSM (AES-CMAC): %w", label, err)
		}
		copy(out.Bytes()[(i-1)*16:], mac)
		clear(mac)
	}
	return out, nil
}
