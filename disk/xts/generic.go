package xts

import (
	"encoding/binary"
	"math/bits"
)

// The pure-Go data path: a classic four-table AES (as in FIPS 197's
// reference implementations) driven by the round keys in the locked buffer.
// The tables are public constants, but lookups indexed by secret state make
// its timing depend on the data and key through the cache, so it is used only
// where the CPU has no AES instructions.

var te0, te1, te2, te3, td0, td1, td2, td3 [256]uint32
var sbox, isbox [256]byte

func init() {
	for i := range 256 {
		s := ctSbox(byte(i))
		sbox[i] = s
		isbox[s] = byte(i)
	}
	for i := range 256 {
		s := uint32(sbox[i])
		w := uint32(gmul(sbox[i], 2))<<24 | s<<16 | s<<8 | uint32(gmul(sbox[i], 3))
		te0[i], te1[i], te2[i], te3[i] = w, bits.RotateLeft32(w, -8), bits.RotateLeft32(w, -16), bits.RotateLeft32(w, -24)
		v := isbox[i]
		w = uint32(gmul(v, 14))<<24 | uint32(gmul(v, 9))<<16 | uint32(gmul(v, 13))<<8 | uint32(gmul(v, 11))
		td0[i], td1[i], td2[i], td3[i] = w, bits.RotateLeft32(w, -8), bits.RotateLeft32(w, -16), bits.RotateLeft32(w, -24)
	}
}

var be = binary.BigEndian

// encryptBlock encrypts the state s (four big-endian column words) with the
// round keys rk.
func encryptBlock(rk []byte, nr int, s0, s1, s2, s3 uint32) (uint32, uint32, uint32, uint32) {
	s0 ^= be.Uint32(rk[0:])
	s1 ^= be.Uint32(rk[4:])
	s2 ^= be.Uint32(rk[8:])
	s3 ^= be.Uint32(rk[12:])
	for r := 1; r < nr; r++ {
		k := rk[16*r : 16*r+16]
		t0 := te0[s0>>24] ^ te1[s1>>16&0xff] ^ te2[s2>>8&0xff] ^ te3[s3&0xff] ^ be.Uint32(k[0:])
		t1 := te0[s1>>24] ^ te1[s2>>16&0xff] ^ te2[s3>>8&0xff] ^ te3[s0&0xff] ^ be.Uint32(k[4:])
		t2 := te0[s2>>24] ^ te1[s3>>16&0xff] ^ te2[s0>>8&0xff] ^ te3[s1&0xff] ^ be.Uint32(k[8:])
		t3 := te0[s3>>24] ^ te1[s0>>16&0xff] ^ te2[s1>>8&0xff] ^ te3[s2&0xff] ^ be.Uint32(k[12:])
		s0, s1, s2, s3 = t0, t1, t2, t3
	}
	k := rk[16*nr : 16*nr+16]
	t0 := uint32(sbox[s0>>24])<<24 | uint32(sbox[s1>>16&0xff])<<16 | uint32(sbox[s2>>8&0xff])<<8 | uint32(sbox[s3&0xff])
	t1 := uint32(sbox[s1>>24])<<24 | uint32(sbox[s2>>16&0xff])<<16 | uint32(sbox[s3>>8&0xff])<<8 | uint32(sbox[s0&0xff])
	t2 := uint32(sbox[s2>>24])<<24 | uint32(sbox[s3>>16&0xff])<<16 | uint32(sbox[s0>>8&0xff])<<8 | uint32(sbox[s1&0xff])
	t3 := uint32(sbox[s3>>24])<<24 | uint32(sbox[s0>>16&0xff])<<16 | uint32(sbox[s1>>8&0xff])<<8 | uint32(sbox[s2&0xff])
	return t0 ^ be.Uint32(k[0:]), t1 ^ be.Uint32(k[4:]), t2 ^ be.Uint32(k[8:]), t3 ^ be.Uint32(k[12:])
}

// decryptBlock is the equivalent inverse cipher with the round keys from
// invertKey.
func decryptBlock(rk []byte, nr int, s0, s1, s2, s3 uint32) (uint32, uint32, uint32, uint32) {
	s0 ^= be.Uint32(rk[0:])
	s1 ^= be.Uint32(rk[4:])
	s2 ^= be.Uint32(rk[8:])
	s3 ^= be.Uint32(rk[12:])
	for r := 1; r < nr; r++ {
		k := rk[16*r : 16*r+16]
		t0 := td0[s0>>24] ^ td1[s3>>16&0xff] ^ td2[s2>>8&0xff] ^ td3[s1&0xff] ^ be.Uint32(k[0:])
		t1 := td0[s1>>24] ^ td1[s0>>16&0xff] ^ td2[s3>>8&0xff] ^ td3[s2&0xff] ^ be.Uint32(k[4:])
		t2 := td0[s2>>24] ^ td1[s1>>16&0xff] ^ td2[s0>>8&0xff] ^ td3[s3&0xff] ^ be.Uint32(k[8:])
		t3 := td0[s3>>24] ^ td1[s2>>16&0xff] ^ td2[s1>>8&0xff] ^ td3[s0&0xff] ^ be.Uint32(k[12:])
		s0, s1, s2, s3 = t0, t1, t2, t3
	}
	k := rk[16*nr : 16*nr+16]
	t0 := uint32(isbox[s0>>24])<<24 | uint32(isbox[s3>>16&0xff])<<16 | uint32(isbox[s2>>8&0xff])<<8 | uint32(isbox[s1&0xff])
	t1 := uint32(isbox[s1>>24])<<24 | uint32(isbox[s0>>16&0xff])<<16 | uint32(isbox[s3>>8&0xff])<<8 | uint32(isbox[s2&0xff])
	t2 := uint32(isbox[s2>>24])<<24 | uint32(isbox[s1>>16&0xff])<<16 | uint32(isbox[s0>>8&0xff])<<8 | uint32(isbox[s3&0xff])
	t3 := uint32(isbox[s3>>24])<<24 | uint32(isbox[s2>>16&0xff])<<16 | uint32(isbox[s1>>8&0xff])<<8 | uint32(isbox[s0&0xff])
	return t0 ^ be.Uint32(k[0:]), t1 ^ be.Uint32(k[4:]), t2 ^ be.Uint32(k[8:]), t3 ^ be.Uint32(k[12:])
}

// cryptGeneric runs XTS over one checked data unit. The tweak is kept as
// two little-endian 64-bit halves, so multiplying by x is a 128-bit shift
// with the carry folded back in as 0x87.
func cryptGeneric(ks []byte, nr int, dst, src []byte, tweak uint64, dec bool) {
	var tb [16]byte
	binary.LittleEndian.PutUint64(tb[:8], tweak)
	t0, t1, t2, t3 := encryptBlock(ks[offEnc2:], nr, be.Uint32(tb[0:]), be.Uint32(tb[4:]), be.Uint32(tb[8:]), be.Uint32(tb[12:]))
	be.PutUint32(tb[0:], t0)
	be.PutUint32(tb[4:], t1)
	be.PutUint32(tb[8:], t2)
	be.PutUint32(tb[12:], t3)
	lo, hi := binary.LittleEndian.Uint64(tb[:8]), binary.LittleEndian.Uint64(tb[8:])

	rk := ks[offEnc1:]
	block := encryptBlock
	if dec {
		rk = ks[offDec1:]
		block = decryptBlock
	}
	for i := 0; i < len(src); i += BlockSize {
		binary.LittleEndian.PutUint64(tb[:8], lo)
		binary.LittleEndian.PutUint64(tb[8:], hi)
		s, d := src[i:i+BlockSize], dst[i:i+BlockSize]
		k0, k1, k2, k3 := be.Uint32(tb[0:]), be.Uint32(tb[4:]), be.Uint32(tb[8:]), be.Uint32(tb[12:])
		s0, s1, s2, s3 := block(rk, nr, be.Uint32(s[0:])^k0, be.Uint32(s[4:])^k1, be.Uint32(s[8:])^k2, be.Uint32(s[12:])^k3)
		be.PutUint32(d[0:], s0^k0)
		be.PutUint32(d[4:], s1^k1)
		be.PutUint32(d[8:], s2^k2)
		be.PutUint32(d[12:], s3^k3)
		carry := hi >> 63
		hi = hi<<1 | lo>>63
		lo = lo<<1 ^ 0x87&-carry
	}
}
