package luks2

import (
	"crypto/sha1"
	"crypto/sha256"
	"crypto/sha512"
	"errors"
	"fmt"
	"hash"
	"runtime"
	"testing"

	"github.com/awnumar/memguard"

	"github.com/keygate/keygate/internal/memscan"
	"github.com/keygate/keygate/internal/testutil"
)

// TestPBKDF2LeavesNoCopy derives a key from a password held only in
// locked memory, destroys the password and the output, and scans the
// process for the password, the HMAC key block (the password, or its hash
// when longer than a block) and both pads, also with the hash's message
// words byte-swapped (as a generic compression function's schedule on the
// stack holds them), in pieces so a partial copy counts. Nothing may be
// found. (disk's TestKeysLeaveNoCopy shows the same needles find
// crypto/hmac's pads.)
func TestPBKDF2LeavesNoCopy(t *testing.T) {
	for _, h := range []struct {
		name string
		new  func() hash.Hash
		word int
	}{{"sha1", sha1.New, 4}, {"sha256", sha256.New, 4}, {"sha512", sha512.New, 8}} {
		bs := h.new().BlockSize()
		for _, pl := range []int{32, bs, bs + 37} {
			t.Run(fmt.Sprintf("%s/pass=%d", h.name, pl), func(t *testing.T) {
				pw := memguard.NewBufferRandom(pl)
				needles := leakNeedles(h.new, pw.Bytes(), h.word)
				out, err := pbkdf2Locked(pw.Bytes(), []byte("salt"), 1000, 64, h.new)
				pw.Destroy()
				if err != nil {
					t.Fatal(err)
				}
				out.Destroy()
				runtime.GC()
				res, err := memscan.Scan(needles)
				if errors.Is(err, memscan.ErrUnavailable) {
					testutil.Skip(t, "procmem", err.Error())
				}
				if err != nil {
					t.Fatal(err)
				}
				for _, hit := range res.Hits {
					t.Errorf("key material left in memory: %v", hit)
				}
			})
		}
	}
}

// leakNeedles returns needles for pw, for HMAC's key block of pw and for
// the key block XOR 0x36 and 0x5c, each also with its w-byte words
// swapped, in 16-byte pieces. The key block's hash is computed in locked
// memory and the stack it passed through is overwritten.
func leakNeedles(newHash func() hash.Hash, pw []byte, w int) []memscan.Needle {
	secrets := []memscan.Needle{memscan.NewNeedle("password", pw)}
	kb := pw
	if h := newHash(); len(pw) > h.BlockSize() {
		lb := memguard.NewBuffer(h.Size())
		defer lb.Destroy()
		scrubStack() // grow the stack first, as pbkdf2Into does
		defer scrubStack()
		h.Write(pw)
		kb = h.Sum(lb.Bytes()[:0])
		scrubHash(h)
		secrets = append(secrets, memscan.NewNeedle("H(password)", kb))
	}
	k := memscan.NewNeedle("key block", kb)
	secrets = append(secrets, k.Xor(0x36), k.Xor(0x5c))
	var needles []memscan.Needle
	for _, s := range secrets {
		needles = append(needles, s.Chunks(16)...)
		needles = append(needles, s.SwapWords(w).Chunks(16)...)
	}
	return needles
}
