package luks2

import (
	"crypto/rand"
	"crypto/sha1"
	"crypto/sha256"
	"crypto/sha512"
	"crypto/subtle"
	"encoding/base64"
	"fmt"
	"hash"

	"github.com/awnumar/memguard"
	"github.com/keygate/keygate/keymem"
	"golang.org/x/crypto/argon2"
)

// PBKDF selects how a keyslot's passphrase becomes its area key.
type PBKDF struct {
	Type       string `json:"type"`                 // "pbkdf2", "argon2id" or "argon2i"
	Hash       string `json:"hash,omitempty"`       // pbkdf2 only: "sha256" (also "sha1", "sha512")
	Iterations int    `json:"iterations,omitempty"` // pbkdf2 iterations
	Time       int    `json:"time,omitempty"`       // argon2 passes
	MemoryKiB  int    `json:"memory_kib,omitempty"` // argon2 memory
	Parallel   int    `json:"parallel,omitempty"`   // argon2 lanes ("cpus" in the JSON)
}

// PassphrasePBKDF is the default for human passphrases (recovery slots):
// argon2id with fixed costs instead of cryptsetup's 2-second benchmark, so
// every machine writes the same profile. 4 passes over 256 MiB with 4 lanes
// takes about a second on a current server core set and stays well inside
// a small VM's memory.
func PassphrasePBKDF() PBKDF {
	return PBKDF{Type: "argon2id", Time: 4, MemoryKiB: 256 << 10, Parallel: 4}
}

// KeyPBKDF is the default for high-entropy secrets such as keygate's 32-byte
// unwrap key: pbkdf2-sha256 at cryptsetup's minimum of 1000 iterations,
// since stretching cannot add strength to a random 256-bit input (the
// choice systemd-cryptenroll makes for TPM2 and FIDO2 slots).
func KeyPBKDF() PBKDF {
	return PBKDF{Type: "pbkdf2", Hash: "sha256", Iterations: 1000}
}

// DigestIterations is the pbkdf2-sha256 iteration count of the volume-key
// digest keygate writes. The digest input is the random volume key, so the
// count only needs to be cryptsetup-plausible; cryptsetup benchmarks it to
// about 125 ms and never goes under 1000.
const DigestIterations = 100000

const saltSize = 32

func (p PBKDF) check() error {
	switch p.Type {
	case "pbkdf2":
		if _, err := pbkdf2Hash(p.Hash); err != nil {
			return err
		}
		if p.Iterations < 1000 || p.Iterations > maxPBKDF2Iterations {
			return fmt.Errorf("pbkdf2 iterations %d: use 1000 (cryptsetup's minimum) to %d (keygate's cap)", p.Iterations, maxPBKDF2Iterations)
		}
	case "argon2id", "argon2i":
		if p.Time < 1 || p.MemoryKiB < 32 || p.Parallel < 1 || p.Parallel > 255 {
			return fmt.Errorf("%s time %d, memory %d KiB, parallel %d: need time >= 1, memory >= 32 KiB, 1 <= parallel <= 255",
				p.Type, p.Time, p.MemoryKiB, p.Parallel)
		}
		if p.MemoryKiB > maxArgon2MemoryKiB {
			return fmt.Errorf("%s memory %d KiB exceeds cryptsetup's 4 GiB maximum", p.Type, p.MemoryKiB)
		}
		if uint64(p.Time)*uint64(p.MemoryKiB) > maxArgon2Work {
			return fmt.Errorf("%s time %d x memory %d KiB exceeds keygate's cap of %d KiB-passes", p.Type, p.Time, p.MemoryKiB, maxArgon2Work)
		}
	default:
		return unsupported("pbkdf "+p.Type, "use pbkdf2, argon2id or argon2i")
	}
	return nil
}

func pbkdf2Hash(name string) (func() hash.Hash, error) {
	switch name {
	case "sha256":
		return sha256.New, nil
	case "sha512":
		return sha512.New, nil
	case "sha1":
		return sha1.New, nil
	}
	return nil, unsupported("pbkdf2 hash "+name, "keygate supports sha1, sha256 and sha512")
}

// toJSON draws a salt and renders p as a keyslot "kdf" object.
func (p PBKDF) toJSON() (*jsonKDF, error) {
	salt := make([]byte, saltSize)
	if _, err := rand.Read(salt); err != nil {
		return nil, fmt.Errorf("draw kdf salt: %w", err)
	}
	k := &jsonKDF{Type: p.Type, Salt: base64.StdEncoding.EncodeToString(salt)}
	if p.Type == "pbkdf2" {
		k.Hash, k.Iterations = p.Hash, p.Iterations
	} else {
		k.Time, k.Memory, k.CPUs = p.Time, p.MemoryKiB, p.Parallel
	}
	return k, nil
}

func (k *jsonKDF) pbkdf() PBKDF {
	return PBKDF{Type: k.Type, Hash: k.Hash, Iterations: k.Iterations, Time: k.Time, MemoryKiB: k.Memory, Parallel: k.CPUs}
}

// deriveKey runs the keyslot KDF and returns the area key in locked memory.
// pbkdf2 runs in locked memory (see pbkdf2.go). argon2 returns its output
// on the heap, where it is copied and wiped; its internal state (blake2b
// buffers the passphrase, and the working memory holds passphrase-derived
// blocks) is beyond our reach: see docs/format.md.
func deriveKey(k *jsonKDF, passphrase []byte, size int) (*memguard.LockedBuffer, error) {
	p := k.pbkdf()
	if err := p.check(); err != nil {
		return nil, err
	}
	salt, err := base64.StdEncoding.DecodeString(k.Salt)
	if err != nil {
		return nil, fmt.Errorf("kdf salt: %v", err)
	}
	var out []byte
	switch p.Type {
	case "pbkdf2":
		h, _ := pbkdf2Hash(p.Hash)
		return pbkdf2Locked(passphrase, salt, p.Iterations, size, h)
	case "argon2id":
		out = argon2.IDKey(passphrase, salt, uint32(p.Time), uint32(p.MemoryKiB), uint8(p.Parallel), uint32(size))
	case "argon2i":
		out = argon2.Key(passphrase, salt, uint32(p.Time), uint32(p.MemoryKiB), uint8(p.Parallel), uint32(size))
	}
	defer clear(out)
	lb, err := keymem.NewLocked(len(out))
	if err != nil {
		return nil, fmt.Errorf("%s: %w", p.Type, err)
	}
	copy(lb.Bytes(), out)
	return lb, nil
}

// newDigest computes the pbkdf2-sha256 digest of the volume key for a new
// volume, as cryptsetup's "pbkdf2" digest type.
func newDigest(vk []byte, iterations int) (*jsonDigest, error) {
	salt := make([]byte, saltSize)
	if _, err := rand.Read(salt); err != nil {
		return nil, fmt.Errorf("draw digest salt: %w", err)
	}
	d, err := pbkdf2Locked(vk, salt, iterations, sha256.Size, sha256.New)
	if err != nil {
		return nil, fmt.Errorf("volume key digest: %w", err)
	}
	defer d.Destroy()
	return &jsonDigest{
		Type: "pbkdf2", Hash: "sha256", Iterations: iterations,
		Salt:   base64.StdEncoding.EncodeToString(salt),
		Digest: base64.StdEncoding.EncodeToString(d.Bytes()),
	}, nil
}

// verify reports, in constant time, whether vk matches the digest.
func (d *jsonDigest) verify(vk []byte) (bool, error) {
	if d.Type != "pbkdf2" {
		return false, unsupported("digest type "+d.Type, "keygate verifies pbkdf2 digests only")
	}
	h, err := pbkdf2Hash(d.Hash)
	if err != nil {
		return false, err
	}
	salt, err1 := base64.StdEncoding.DecodeString(d.Salt)
	want, err2 := base64.StdEncoding.DecodeString(d.Digest)
	if err1 != nil || err2 != nil {
		return false, fmt.Errorf("digest: bad base64")
	}
	if len(want) == 0 {
		return false, fmt.Errorf("digest: empty")
	}
	got, err := pbkdf2Locked(vk, salt, d.Iterations, len(want), h)
	if err != nil {
		return false, fmt.Errorf("digest: %w", err)
	}
	defer got.Destroy()
	return subtle.ConstantTimeCompare(got.Bytes(), want) == 1, nil
}
