package luks2

import (
	"crypto/rand"
	"crypto/sha1"
	"crypto/sha256"
	"crypto/sha512"
	"encoding/binary"
	"fmt"
	"hash"

	"github.com/awnumar/memguard"
	"github.com/keygate/keygate/keymem"
)

// The anti-forensic splitter of LUKS1 (af type "luks1"), which LUKS2
// keeps: the key is spread over `stripes` blocks, all but the last random,
// chained through a hash "diffuser", so that destroying any part of the
// area destroys the key.

// AFStripes is the number of stripes keygate writes (cryptsetup's value).
const AFStripes = 4000

// afSize is how many bytes of keyslot area hold the split key: the split
// material rounded up to 512-byte sectors, as cryptsetup encrypts it.
func afSize(keySize, stripes int) uint64 {
	n := uint64(keySize) * uint64(stripes)
	return (n + 511) / 512 * 512
}

func afHash(name string) (func() hash.Hash, error) {
	switch name {
	case "sha256":
		return sha256.New, nil
	case "sha512":
		return sha512.New, nil
	case "sha1":
		return sha1.New, nil
	}
	return nil, unsupported("af hash "+name, "keygate supports sha1, sha256 and sha512")
}

// scrubHash clears the input buffer a hash.Hash keeps between writes: the
// standard library's Reset leaves it in place, and it held key material.
func scrubHash(h hash.Hash) {
	var zero [256]byte
	h.Reset()
	h.Write(zero[:h.BlockSize()-1])
	h.Reset()
}

// diffuse replaces block with its diffusion: each hash-sized chunk i becomes
// H(be32(i) || chunk), truncated for a short last chunk. sum is scratch
// space of at least the hash size, in locked memory.
func diffuse(newHash func() hash.Hash, block, sum []byte) {
	h := newHash()
	defer scrubHash(h)
	ds := h.Size()
	var iv [4]byte
	for i := 0; i*ds < len(block); i++ {
		chunk := block[i*ds : min((i+1)*ds, len(block))]
		h.Reset()
		binary.BigEndian.PutUint32(iv[:], uint32(i))
		h.Write(iv[:])
		h.Write(chunk)
		copy(chunk, h.Sum(sum[:0]))
	}
	memguard.WipeBytes(sum)
}

// afSplit splits key into dst, which must be len(key)*stripes bytes (or
// longer; the rest is left alone).
func afSplit(dst, key []byte, stripes int, hashName string) error {
	newHash, err := afHash(hashName)
	if err != nil {
		return err
	}
	bs := len(key)
	if len(dst) < bs*stripes {
		return fmt.Errorf("af split: buffer too short")
	}
	scratch, err := keymem.New(bs + sha512.Size)
	if err != nil {
		return fmt.Errorf("af: %w", err)
	}
	defer scratch.Destroy()
	buf, sum := scratch.Bytes()[:bs], scratch.Bytes()[bs:]
	for i := 0; i < stripes-1; i++ {
		s := dst[i*bs : (i+1)*bs]
		if _, err := rand.Read(s); err != nil {
			return fmt.Errorf("af split: random stripe: %w", err)
		}
		xorInto(buf, s)
		diffuse(newHash, buf, sum)
	}
	last := dst[(stripes-1)*bs : stripes*bs]
	for j := range last {
		last[j] = buf[j] ^ key[j]
	}
	return nil
}

// afMerge recovers a key of len(key) bytes from split material src.
func afMerge(key, src []byte, stripes int, hashName string) error {
	newHash, err := afHash(hashName)
	if err != nil {
		return err
	}
	bs := len(key)
	if len(src) < bs*stripes {
		return fmt.Errorf("af merge: material too short")
	}
	scratch, err := keymem.New(bs + sha512.Size)
	if err != nil {
		return fmt.Errorf("af: %w", err)
	}
	defer scratch.Destroy()
	buf, sum := scratch.Bytes()[:bs], scratch.Bytes()[bs:]
	for i := 0; i < stripes-1; i++ {
		xorInto(buf, src[i*bs:(i+1)*bs])
		diffuse(newHash, buf, sum)
	}
	last := src[(stripes-1)*bs : stripes*bs]
	for j := range key {
		key[j] = buf[j] ^ last[j]
	}
	return nil
}

func xorInto(dst, src []byte) {
	for i := range dst {
		dst[i] ^= src[i]
	}
}
