package xts

// The key schedule is computed byte by byte in place in the locked buffer:
// no word of key material is gathered into a named Go variable that could be
// spilled to the stack, and the S-box used here is computed arithmetically
// (no table lookup indexed by key bytes), so the expansion is constant-time
// on every architecture.

// xtime multiplies by x in GF(2^8) modulo x^8+x^4+x^3+x+1, without a branch.
func xtime(a byte) byte { return a<<1 ^ 0x1b&-(a>>7) }

// gmul multiplies a by the public constant k in GF(2^8). The loop depends
// only on k, never on a.
func gmul(a, k byte) byte {
	var p byte
	for ; k != 0; k >>= 1 {
		p ^= a & -(k & 1)
		a = xtime(a)
	}
	return p
}

// ctSbox is the AES S-box computed as the affine map of a^254 (the field
// inverse, 0 for 0). The square-and-multiply chain is fixed by the public
// exponent, so timing does not depend on a.
func ctSbox(a byte) byte {
	a2 := gmulVar(a, a)
	a3 := gmulVar(a2, a)     // a^3
	a6 := gmulVar(a3, a3)    // a^6
	a7 := gmulVar(a6, a)     // a^7
	a14 := gmulVar(a7, a7)   // a^14
	a15 := gmulVar(a14, a)   // a^15
	a30 := gmulVar(a15, a15) // a^30
	a60 := gmulVar(a30, a30)
	a120 := gmulVar(a60, a60)
	a127 := gmulVar(a120, a7)
	inv := gmulVar(a127, a127) // a^254
	return inv ^ rotl8(inv, 1) ^ rotl8(inv, 2) ^ rotl8(inv, 3) ^ rotl8(inv, 4) ^ 0x63
}

// gmulVar multiplies two secret field elements in constant time: eight
// rounds whatever the operands.
func gmulVar(a, b byte) byte {
	var p byte
	for range 8 {
		p ^= a & -(b & 1)
		a = xtime(a)
		b >>= 1
	}
	return p
}

func rotl8(b byte, n uint) byte { return b<<n | b>>(8-n) }

// expandKey writes the FIPS 197 encryption key schedule of key (16 or 32
// bytes) into w, which must be locked memory of at least 16*(rounds+1) bytes.
// Round key r occupies w[16r:16r+16] in the byte order AESENC expects.
func expandKey(w, key []byte) {
	nk := len(key) / 4
	nwords := 4 * (nk + 6 + 1)
	copy(w, key)
	rcon := byte(1)
	for i := nk; i < nwords; i++ {
		p := w[4*(i-1) : 4*i]         // previous word
		q := w[4*(i-nk) : 4*(i-nk)+4] // word nk back
		d := w[4*i : 4*i+4]
		switch {
		case i%nk == 0: // RotWord, SubWord, Rcon
			d[0] = q[0] ^ ctSbox(p[1]) ^ rcon
			d[1] = q[1] ^ ctSbox(p[2])
			d[2] = q[2] ^ ctSbox(p[3])
			d[3] = q[3] ^ ctSbox(p[0])
			rcon = xtime(rcon)
		case nk > 6 && i%nk == 4: // AES-256's extra SubWord
			for j := range 4 {
				d[j] = q[j] ^ ctSbox(p[j])
			}
		default:
			for j := range 4 {
				d[j] = q[j] ^ p[j]
			}
		}
	}
}

// invertKey writes the round keys of the equivalent inverse cipher (FIPS 197
// 5.3.5) into dk, in the order decryption uses them: what AESDEC and the
// table-based decryption both want. This is what AESIMC computes, done in Go
// so that every architecture shares one tested path.
func invertKey(dk, ek []byte, nr int) {
	copy(dk[:16], ek[16*nr:16*nr+16])
	copy(dk[16*nr:16*nr+16], ek[:16])
	for r := 1; r < nr; r++ {
		s := ek[16*(nr-r) : 16*(nr-r)+16]
		d := dk[16*r : 16*r+16]
		for c := 0; c < 16; c += 4 {
			d[c+0] = gmul(s[c], 14) ^ gmul(s[c+1], 11) ^ gmul(s[c+2], 13) ^ gmul(s[c+3], 9)
			d[c+1] = gmul(s[c], 9) ^ gmul(s[c+1], 14) ^ gmul(s[c+2], 11) ^ gmul(s[c+3], 13)
			d[c+2] = gmul(s[c], 13) ^ gmul(s[c+1], 9) ^ gmul(s[c+2], 14) ^ gmul(s[c+3], 11)
			d[c+3] = gmul(s[c], 11) ^ gmul(s[c+1], 13) ^ gmul(s[c+2], 9) ^ gmul(s[c+3], 14)
		}
	}
}
