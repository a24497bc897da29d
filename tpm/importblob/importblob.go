// Package importblob makes TPM 2.0 import blobs on the key service's side:
// a secret (a volume's unwrap key) duplicated to one TPM's endorsement key
// and, optionally, bound to PCR values, in the ImportBlob format that
// go-tpm-tools' client imports (and tpm.TPM.Import turns back into the
// secret).
//
// It exists because go-tpm-tools' server.CreateImportBlob, which builds the
// same blob, copies the secret three times on the way (the public area's
// unique digest state, the encoded sensitive area, and its size-prefixed
// copy) into heap memory that nobody wipes: every release left the unwrap
// key on the key service's Go heap until the memory was reused. Here every
// buffer that holds the secret, or a key that would decrypt the blob, is
// key memory (package keymem: locked, wiped on return), and the hash inputs
// are laid out so that no hash state keeps a copy. What remains outside
// locked memory is listed in docs/threat-model.md ("Key memory").
//
// The blob is TPM2_Import's input as TPM 2.0 Part 1 (section 23, "Protected
// storage" duplication with an outer wrapper) defines it: a keyedHash data
// object, its sensitive area encrypted with AES-CFB under a key derived
// from a seed, an HMAC over the ciphertext and the object's name, and the
// seed encrypted to the EK (ECDH for ECC EKs, OAEP for RSA EKs).
package importblob

import (
	"crypto"
	"crypto/aes"
	"crypto/cipher"
	"crypto/ecdh"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"reflect"
	"sync"
	"unsafe"

	tpmpb "github.com/google/go-tpm-tools/proto/tpm"
	"github.com/google/go-tpm-tools/server"
	"github.com/google/go-tpm/legacy/tpm2"
	"github.com/google/go-tpm/tpmutil"

	"github.com/keygate/keygate/keymem"
)

// MaxSecret is the largest secret a keyedHash data object holds
// (MAX_SYM_DATA in the TPM 2.0 specification).
const MaxSecret = 128

// Errors wrapped by New.
var (
	ErrSecretSize = fmt.Errorf("secret must be 1 to %d bytes", MaxSecret)
	ErrEK         = errors.New("unsupported endorsement key")
	ErrPCRs       = errors.New("unsupported PCR binding")
)

const (
	hashSize  = sha256.Size
	blockSize = sha256.BlockSize
)

// New duplicates secret to the TPM whose endorsement public key is ek (an
// *ecdsa.PublicKey on P-256 or an *rsa.PublicKey, as the TPM's default EK
// templates make them). If pcrs names PCR values, the TPM imports the blob
// only while its PCRs (in pcrs' bank) have those values. secret should be
// in locked memory; New copies it only into key memory and wipes every
// such copy before it returns.
func New(ek crypto.PublicKey, secret []byte, pcrs *tpmpb.PCRs) (*tpmpb.ImportBlob, error) {
	if len(secret) == 0 || len(secret) > MaxSecret {
		return nil, fmt.Errorf("import blob: %w (got %d)", ErrSecretSize, len(secret))
	}
	ekPub, err := ekPublic(ek)
	if err != nil {
		return nil, err
	}
	policy, err := policyDigest(pcrs)
	if err != nil {
		return nil, err
	}

	// One locked scratch area for everything secret: the sensitive area
	// and its hash input, the seed, the keys derived from it, and the
	// KDF and HMAC inputs.
	scratch := scratchPool().Get()
	defer scratchPool().Put(scratch) // wiped there
	mem := scratch.Bytes()
	take := func(n int) []byte { b := mem[:n:n]; mem = mem[n:]; return b }
	sens := take(sensMax)
	unique := take(hashSize + len(secret))
	seed := take(hashSize)
	symKey := take(hashSize)
	macKey := take(hashSize)
	kdfBuf := take(kdfMax)
	keystream := take(aes.BlockSize)

	// TPMT_SENSITIVE for a keyedHash object, after TPM2B's size prefix:
	// sensitiveType, authValue (empty), seedValue, sensitive (the secret).
	// seedValue is a random obfuscation value hashed into the public
	// area's unique field, so that the public area says nothing about the
	// secret.
	obf := unique[:hashSize]
	if _, err := rand.Read(obf); err != nil {
		return nil, fmt.Errorf("import blob: random: %w", err)
	}
	copy(unique[hashSize:], secret)
	n := 2
	n += putU16(sens[n:], uint16(tpm2.AlgKeyedHash))
	n += putU16(sens[n:], 0)
	n += putU16(sens[n:], hashSize)
	n += copy(sens[n:], obf)
	n += putU16(sens[n:], uint16(len(secret)))
	n += copy(sens[n:], secret)
	putU16(sens, uint16(n-2))
	sens = sens[:n]

	public := tpm2.Public{
		Type:    tpm2.AlgKeyedHash,
		NameAlg: tpm2.AlgSHA256,
		KeyedHashParameters: &tpm2.KeyedHashParams{
			Alg:    tpm2.AlgNull,
			Unique: sum(unique),
		},
	}
	if policy == nil {
		// No PCRs: the object is used with an empty password.
		public.Attributes = tpm2.FlagUserWithAuth
	} else {
		public.AuthPolicy = policy
		public.Attributes = tpm2.FlagAdminWithPolicy
	}
	pubArea, err := public.Encode()
	if err != nil {
		return nil, fmt.Errorf("import blob: encode public area: %w", err)
	}
	name, err := public.Name()
	if err != nil {
		return nil, fmt.Errorf("import blob: object name: %w", err)
	}
	nameEnc, err := name.Digest.Encode()
	if err != nil {
		return nil, fmt.Errorf("import blob: object name: %w", err)
	}

	seedLen, encSeed, err := ekPub.seed(seed, kdfBuf)
	if err != nil {
		return nil, err
	}
	seed = seed[:seedLen]
	symKey = symKey[:ekPub.symBits/8]
	kdfa(symKey, seed, "STORAGE", nameEnc, kdfBuf)
	kdfa(macKey, seed, "INTEGRITY", nil, kdfBuf)

	encSens := make([]byte, len(sens))
	if err := cfbEncrypt(encSens, sens, symKey, keystream); err != nil {
		return nil, err
	}
	mac := hmacSHA256(macKey, kdfBuf, encSens, nameEnc)
	dup, err := tpmutil.Pack(tpm2.IDObject{IntegrityHMAC: mac, EncIdentity: encSens})
	if err != nil {
		return nil, fmt.Errorf("import blob: encode duplicate: %w", err)
	}
	return &tpmpb.ImportBlob{Duplicate: dup, EncryptedSeed: encSeed, PublicArea: pubArea, Pcrs: pcrs}, nil
}

// Sizes of the scratch: the size-prefixed TPMT_SENSITIVE, the unique
// field's hash input, seed, two derived keys, HMAC and KDF inputs, and one
// block of CFB keystream.
const (
	sensMax    = 2 + 2 + 2 + 2 + hashSize + 2 + MaxSecret
	kdfMax     = blockSize + sensMax + 2 + hashSize // HMAC's key block and its longest message
	scratchLen = sensMax + hashSize + MaxSecret + 3*hashSize + kdfMax + aes.BlockSize
)

var (
	poolOnce sync.Once
	pool     *keymem.Pool
)

// scratchPool holds locked scratch areas for New, so that a release does
// not pay for mapping and locking fresh memory (which made New four times
// slower than the builder it replaces).
func scratchPool() *keymem.Pool {
	poolOnce.Do(func() { pool = keymem.NewPool(16, scratchLen) })
	return pool
}

func putU16(b []byte, v uint16) int { binary.BigEndian.PutUint16(b, v); return 2 }

// sum is SHA-256 of p, hashed with p passed in one Write. crypto/sha256
// processes the whole blocks of that Write in place and copies only the
// trailing partial block into its state: for obf||secret that tail holds
// the secret's bytes past the first block (none for secrets of up to 32
// bytes, the unwrap key's size); the state is then overwritten by padding.
func sum(p []byte) []byte {
	d := sha256.Sum256(p)
	return d[:]
}

// ek is an endorsement key and how to make a seed for it.
type ekKey struct {
	pub     tpm2.Public
	symBits int
	ecc     *ecdh.PublicKey
	rsa     *rsa.PublicKey
}

func ekPublic(k crypto.PublicKey) (*ekKey, error) {
	switch key := k.(type) {
	case *ecdsa.PublicKey:
		pub, err := server.CreateEKPublicAreaFromKey(key)
		if err != nil {
			return nil, fmt.Errorf("import blob: %w: %v", ErrEK, err)
		}
		ec, err := key.ECDH()
		if err != nil || ec.Curve() != ecdh.P256() {
			return nil, fmt.Errorf("import blob: %w: an ECC EK must be on P-256 (the TPM's default EK template)", ErrEK)
		}
		return &ekKey{pub: pub, symBits: int(pub.ECCParameters.Symmetric.KeyBits), ecc: ec}, nil
	case *rsa.PublicKey:
		pub, err := server.CreateEKPublicAreaFromKey(key)
		if err != nil {
			return nil, fmt.Errorf("import blob: %w: %v", ErrEK, err)
		}
		return &ekKey{pub: pub, symBits: int(pub.RSAParameters.Symmetric.KeyBits), rsa: key}, nil
	case nil:
		return nil, fmt.Errorf("import blob: %w: none given", ErrEK)
	default:
		return nil, fmt.Errorf("import blob: %w: %T (want an ECC P-256 or RSA EK)", ErrEK, k)
	}
}

// seed writes the duplication seed to the start of seed, and returns its
// length and the seed encrypted to the EK, in the form TPM2_Import takes.
func (k *ekKey) seed(seed, scratch []byte) (int, []byte, error) {
	if k.rsa != nil {
		// An RSA EK's seed is as long as its symmetric key.
		s := seed[:k.symBits/8]
		if _, err := rand.Read(s); err != nil {
			return 0, nil, fmt.Errorf("import blob: random: %w", err)
		}
		// crypto/rsa pads the seed into a buffer of its own that it
		// does not wipe (docs/threat-model.md lists it); ECC EKs, the
		// default, avoid it.
		enc, err := rsa.EncryptOAEP(sha256.New(), rand.Reader, k.rsa, s, []byte("DUPLICATE\x00"))
		if err != nil {
			return 0, nil, fmt.Errorf("import blob: encrypt seed to the EK: %w", err)
		}
		// The OAEP ciphertext is the TPM2B's content as it is; the
		// client adds the size when it sends TPM2_Import.
		return len(s), enc, nil
	}
	eph, err := ecdh.P256().GenerateKey(rand.Reader)
	if err != nil {
		return 0, nil, fmt.Errorf("import blob: ephemeral key: %w", err)
	}
	z, err := eph.ECDH(k.ecc)
	if err != nil {
		return 0, nil, fmt.Errorf("import blob: ECDH with the EK: %w", err)
	}
	// KDFe(SHA-256, Z, "DUPLICATE", ephemeral x, EK x, 256): one hash
	// block's worth of counter and Z first, so Z never sits in the hash
	// state's tail buffer.
	ephPt := eph.PublicKey().Bytes() // 0x04 || x || y
	ekPt := k.ecc.Bytes()
	msg := scratch[:0]
	msg = binary.BigEndian.AppendUint32(msg, 1)
	msg = append(msg, z...)
	clear(z)
	msg = append(msg, "DUPLICATE\x00"...)
	msg = append(msg, ephPt[1:33]...)
	msg = append(msg, ekPt[1:33]...)
	d := sha256.Sum256(msg)
	n := copy(seed, d[:])
	clear(d[:])
	clear(msg)
	packed, err := tpmutil.Pack(tpmutil.U16Bytes(ephPt[1:33]), tpmutil.U16Bytes(ephPt[33:65]))
	return n, packed, err
}

// kdfa fills out with KDFa(SHA-256, key, label, contextU, nil, 8*len(out))
// (TPM 2.0 Part 1, 11.4.10.2) for outputs of at most one hash: one HMAC
// over counter || label || 0 || contextU || bits.
func kdfa(out, key []byte, label string, contextU, scratch []byte) {
	msg := binary.BigEndian.AppendUint32(nil, 1)
	msg = append(msg, label...)
	msg = append(msg, 0)
	msg = append(msg, contextU...)
	msg = binary.BigEndian.AppendUint32(msg, uint32(8*len(out)))
	d := hmacSHA256(key, scratch, msg)
	copy(out, d)
	clear(d)
}

// hmacSHA256 is HMAC-SHA256(key, parts...) for a key of at most one block,
// computed so that key-derived bytes appear only in scratch (key memory):
// each hash gets the padded key block and its message in one Write, so
// sha256 processes the key block in place and never copies it into its
// state. Only the message parts (public here) and the inner digest reach
// the state's tail buffer.
func hmacSHA256(key, scratch []byte, parts ...[]byte) []byte {
	n := 0
	for _, p := range parts {
		n += len(p)
	}
	buf := scratch[:blockSize+max(n, hashSize)]
	defer clear(buf)
	pad := func(x byte) {
		clear(buf[:blockSize])
		copy(buf, key)
		for i := range blockSize {
			buf[i] ^= x
		}
	}
	pad(0x36)
	off := blockSize
	for _, p := range parts {
		off += copy(buf[off:], p)
	}
	inner := sha256.Sum256(buf[:off])
	pad(0x5c)
	copy(buf[blockSize:], inner[:])
	out := sha256.Sum256(buf[:blockSize+hashSize])
	return out[:]
}

// cfbEncrypt is AES-CFB with a zero IV (what TPM2_Import expects of the
// outer wrapper), with the keystream in key memory and the key schedule
// wiped after use.
func cfbEncrypt(dst, src, key, k []byte) error {
	b, err := aes.NewCipher(key)
	if err != nil {
		return fmt.Errorf("import blob: %w", err)
	}
	defer wipeBlock(b)
	prev := make([]byte, aes.BlockSize) // the zero IV, then each ciphertext block
	for i := 0; i < len(src); i += aes.BlockSize {
		b.Encrypt(k, prev)
		end := min(i+aes.BlockSize, len(src))
		for j := i; j < end; j++ {
			dst[j] = src[j] ^ k[j-i]
		}
		prev = dst[i:end]
	}
	return nil
}

// wipeBlock zeroes the key schedule inside a crypto/aes block. crypto/aes
// offers no way to destroy one, and its schedule gives the key back
// directly (its first round key is the key). The block is a pointer to a
// struct of arrays; zeroing it through unsafe is sound as long as it is
// never used again.
func wipeBlock(b cipher.Block) {
	v := reflect.ValueOf(b)
	if v.Kind() != reflect.Pointer || v.IsNil() {
		return
	}
	clear(unsafe.Slice((*byte)(v.UnsafePointer()), v.Type().Elem().Size()))
}

// policyDigest is the policy a TPM2_PolicyPCR session over pcrs reaches
// (SHA-256 session), or nil for no PCRs: the object's authPolicy.
func policyDigest(pcrs *tpmpb.PCRs) ([]byte, error) {
	if len(pcrs.GetPcrs()) == 0 {
		return nil, nil
	}
	alg := tpm2.Algorithm(pcrs.GetHash())
	h, err := alg.Hash()
	if err != nil {
		return nil, fmt.Errorf("import blob: %w: PCR bank %v", ErrPCRs, pcrs.GetHash())
	}
	var sel [3]byte
	values := sha256.New()
	for i := range uint32(24) {
		v, ok := pcrs.GetPcrs()[i]
		if !ok {
			continue
		}
		if len(v) != h.Size() {
			return nil, fmt.Errorf("import blob: %w: PCR %d value is %d bytes, want %d for its bank", ErrPCRs, i, len(v), h.Size())
		}
		sel[i/8] |= 1 << (i % 8)
		values.Write(v)
	}
	for i := range pcrs.GetPcrs() {
		if i >= 24 {
			return nil, fmt.Errorf("import blob: %w: PCR %d (a TPM has 0 to 23)", ErrPCRs, i)
		}
	}
	d := sha256.New()
	d.Write(make([]byte, hashSize)) // the session's initial, all-zero digest
	d.Write(binary.BigEndian.AppendUint32(nil, uint32(tpm2.CmdPolicyPCR)))
	d.Write(binary.BigEndian.AppendUint32(nil, 1)) // TPML_PCR_SELECTION: one bank
	d.Write(binary.BigEndian.AppendUint16(nil, uint16(alg)))
	d.Write([]byte{3})
	d.Write(sel[:])
	d.Write(values.Sum(nil))
	return d.Sum(nil), nil
}
