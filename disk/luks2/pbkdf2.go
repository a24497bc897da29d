package luks2

import (
	"encoding"
	"encoding/binary"
	"fmt"
	"hash"

	"github.com/awnumar/memguard"
	"github.com/keygate/keygate/keymem"
)

// PBKDF2 (RFC 8018, section 5.2) over HMAC (RFC 2104), written so that the
// password never reaches the Go heap or stack, nor does any reversible
// transform of it. x/crypto's pbkdf2, through crypto/hmac, copies the key
// into heap ipad/opad arrays (key XOR 0x36 and 0x5c) and leaves them there
// as garbage; for keygate the password is the unwrap key or the volume key.
//
// Here the HMAC key block and the two pads are built in a locked buffer.
// Each pad is one full hash block, so Write hands it straight to the
// compression function without copying it into the digest's input buffer.
// The states after absorbing the pads (compression-function outputs: they
// let one compute the HMAC but are not the key) are marshaled into the
// same locked buffer, and every HMAC starts by unmarshaling them. U, the
// inner sum and the output block T live in locked memory too.
//
// Copies that cannot be avoided are cleaned up: the generic (non-assembly)
// compression functions put the pad words in a message schedule on the
// stack; hashing an over-long password leaves its tail in the digest's
// input buffer and in a copy of the digest on the stack (Sum); U and the
// inner sum pass through the digests' input buffers, and an absorbed state
// sits in a digest while an HMAC runs. So the goroutine stack below
// pbkdf2Into is grown before any of this (no stack move leaves an old copy
// behind) and overwritten when it returns, and the digests are scrubbed.
//
// Out of reach: a signal that interrupts one of the two pad compressions
// can save pad words from registers in a signal frame, and a GC that
// shrinks the stack at that moment leaves the old stack unwiped.

// stackScrubSize is how much of the goroutine stack below pbkdf2Into is
// overwritten: far more than the frames of the HMAC and hash calls need.
const stackScrubSize = 16 << 10

// maxStateSize bounds the marshaled state of sha1, sha256 and sha512
// (204 bytes for sha512).
const maxStateSize = 256

// pbkdf2Locked derives keyLen bytes from password and salt with PBKDF2 over
// HMAC-newHash, and returns them in a locked buffer.
func pbkdf2Locked(password, salt []byte, iter, keyLen int, newHash func() hash.Hash) (*memguard.LockedBuffer, error) {
	if keyLen <= 0 {
		return nil, fmt.Errorf("pbkdf2: key length %d: need at least 1 byte", keyLen)
	}
	out, err := keymem.NewLocked(keyLen)
	if err != nil {
		return nil, fmt.Errorf("pbkdf2: %w", err)
	}
	if err := pbkdf2Into(out.Bytes(), password, salt, iter, newHash); err != nil {
		out.Destroy()
		return nil, err
	}
	return out, nil
}

// pbkdf2Into fills out, which the caller keeps in locked memory, with
// PBKDF2-HMAC-newHash(password, salt, iter). newHash must return a hash
// whose state marshals (sha1, sha256 and sha512 do).
func pbkdf2Into(out, password, salt []byte, iter int, newHash func() hash.Hash) (err error) {
	if iter < 1 {
		return fmt.Errorf("pbkdf2: %d iterations: need at least 1", iter)
	}
	// Grow the stack now, while it holds nothing secret, so that no stack
	// move leaves a stale copy of a frame below; overwrite it again on
	// the way out.
	scrubStack()
	defer scrubStack()

	m, err := newPRF(password, newHash)
	if err != nil {
		return err
	}
	defer m.destroy()

	var ctr [4]byte
	for block, off := uint32(1), 0; off < len(out); block, off = block+1, off+m.size {
		t := out[off:min(off+m.size, len(out))]
		binary.BigEndian.PutUint32(ctr[:], block)
		// U_1 = PRF(P, S || INT(i))
		u := m.sum(m.u[:0], salt, ctr[:])
		copy(t, u)
		for n := 1; n < iter; n++ {
			// U_n = PRF(P, U_{n-1}); T ^= U_n
			u = m.sum(m.u[:0], u, nil)
			for i := range t {
				t[i] ^= u[i]
			}
		}
	}
	return nil
}

// prf is HMAC-H keyed once, with its secret state in locked memory.
type prf struct {
	inner, outer hash.Hash
	lb           *keymem.Buffer
	istate       []byte // inner state after key^ipad
	ostate       []byte // outer state after key^opad
	u, isum      []byte // U_n, and the inner digest of the current HMAC
	size         int
}

func newPRF(password []byte, newHash func() hash.Hash) (*prf, error) {
	inner, outer := newHash(), newHash()
	bs, size := inner.BlockSize(), inner.Size()
	if _, ok := inner.(encoding.BinaryUnmarshaler); !ok {
		return nil, fmt.Errorf("pbkdf2: %T cannot restore its state", inner)
	}
	ia, ok1 := inner.(encoding.BinaryAppender)
	oa, ok2 := outer.(encoding.BinaryAppender)
	if !ok1 || !ok2 || bs > 128 || size > bs {
		return nil, fmt.Errorf("pbkdf2: %T cannot save its state", inner)
	}
	// Layout: key block | pad | inner state | outer state | U | inner sum.
	lb, err := keymem.New(2*bs + 2*maxStateSize + 2*size)
	if err != nil {
		return nil, fmt.Errorf("pbkdf2: %w", err)
	}
	b := lb.Bytes()
	kb, pad := b[:bs], b[bs:2*bs]
	b = b[2*bs:]
	m := &prf{inner: inner, outer: outer, lb: lb, size: size}
	m.u, m.isum = b[2*maxStateSize:][:size], b[2*maxStateSize+size:][:size]

	// The key block: the password, or its hash when longer than a block,
	// zero-padded to the block size.
	if len(password) > bs {
		inner.Write(password)
		inner.Sum(kb[:0])
		scrubHash(inner) // it buffered the password's tail
	} else {
		copy(kb, password)
	}

	for _, s := range []struct {
		h   hash.Hash
		a   encoding.BinaryAppender
		x   byte
		dst *[]byte
		at  []byte
	}{
		{inner, ia, 0x36, &m.istate, b[:maxStateSize:maxStateSize]},
		{outer, oa, 0x5c, &m.ostate, b[maxStateSize : 2*maxStateSize : 2*maxStateSize]},
	} {
		for i := range pad {
			pad[i] = kb[i] ^ s.x
		}
		s.h.Reset()
		s.h.Write(pad) // one full block: compressed in place, not buffered
		var st []byte
		st, err = s.a.AppendBinary(s.at[:0])
		if err == nil && (len(st) == 0 || &st[0] != &s.at[0]) {
			err = fmt.Errorf("pbkdf2: %T state does not fit in %d bytes", s.h, maxStateSize)
		}
		*s.dst = st
		if err != nil {
			break
		}
	}
	memguard.WipeBytes(kb)
	memguard.WipeBytes(pad)
	if err != nil {
		m.destroy()
		return nil, err
	}
	return m, nil
}

// sum appends HMAC(key, a || b) to dst, which must have room for it (the
// result then stays in dst's locked memory).
func (m *prf) sum(dst, a, b []byte) []byte {
	m.inner.(encoding.BinaryUnmarshaler).UnmarshalBinary(m.istate) // cannot fail: the state came from this hash
	m.inner.Write(a)
	m.inner.Write(b)
	is := m.inner.Sum(m.isum[:0])
	m.outer.(encoding.BinaryUnmarshaler).UnmarshalBinary(m.ostate)
	m.outer.Write(is)
	return m.outer.Sum(dst)
}

// destroy scrubs the digests (they last held the state of an HMAC of U)
// and wipes the locked states.
func (m *prf) destroy() {
	scrubHash(m.inner)
	scrubHash(m.outer)
	m.lb.Destroy()
}

// scrubStack overwrites stackScrubSize bytes of the goroutine stack below
// its caller's frame, where the frames of the caller's callees were.
//
//go:noinline
func scrubStack() {
	var b [stackScrubSize]byte
	wipeFrame(&b)
}

//go:noinline
func wipeFrame(b *[stackScrubSize]byte) { clear(b[:]) }
