package masterkey_test

import (
	"bytes"
	"errors"
	"io"
	"testing"

	"github.com/awnumar/memguard"

	"github.com/keygate/keygate/keysvc/masterkey"
)

func TestOpenTo(t *testing.T) {
	k := fixedKey(t)
	secret := []byte("unwrap-key-0123456789abcdef01234")
	sealed, err := k.Seal("vol-1", secret)
	if err != nil {
		t.Fatal(err)
	}
	buf := memguard.NewBuffer(128)
	defer buf.Destroy()

	t.Run("round trip", func(t *testing.T) {
		for _, size := range []int{len(secret), 128} {
			dst := buf.Bytes()[:size]
			n, err := k.OpenTo(dst, "vol-1", sealed)
			if err != nil {
				t.Fatalf("%d-byte dst: %v", size, err)
			}
			if n != len(secret) || !bytes.Equal(dst[:n], secret) {
				t.Fatalf("%d-byte dst: got %d bytes %q, want %q", size, n, dst[:n], secret)
			}
			buf.Wipe()
		}
	})

	flip := func(i int) []byte {
		b := bytes.Clone(sealed)
		b[i] ^= 1
		return b
	}
	for _, tt := range []struct {
		name   string
		id     string
		sealed []byte
		dst    int
		want   error
	}{
		{"wrong record ID", "vol-2", sealed, 128, masterkey.ErrOpen},
		{"flipped ciphertext", "vol-1", flip(20), 128, masterkey.ErrOpen},
		{"flipped tag", "vol-1", flip(len(sealed) - 1), 128, masterkey.ErrOpen},
		{"flipped version", "vol-1", flip(0), 128, masterkey.ErrOpen},
		{"truncated", "vol-1", sealed[:masterkey.SealOverhead], 128, masterkey.ErrOpen},
		{"short buffer", "vol-1", sealed, len(secret) - 1, io.ErrShortBuffer},
	} {
		t.Run(tt.name, func(t *testing.T) {
			// Stale bytes in dst must not survive a failure either.
			dst := buf.Bytes()[:tt.dst]
			for i := range dst {
				dst[i] = 0xa5
			}
			n, err := k.OpenTo(dst, tt.id, tt.sealed)
			if !errors.Is(err, tt.want) {
				t.Fatalf("OpenTo: n=%d err=%v, want %v", n, err, tt.want)
			}
			if n != 0 {
				t.Errorf("n = %d on error", n)
			}
			if !allZero(dst) {
				t.Errorf("dst not wiped after %v: %x", err, dst)
			}
		})
	}
}

// TestOpenToConcurrent opens into separate buffers from many goroutines
// with one Key (run it with -race).
func TestOpenToConcurrent(t *testing.T) {
	k := fixedKey(t)
	secret := bytes.Repeat([]byte{7}, 32)
	sealed, err := k.Seal("vol-1", secret)
	if err != nil {
		t.Fatal(err)
	}
	errs := make(chan error, 16)
	for range 16 {
		go func() {
			buf := memguard.NewBuffer(64)
			defer buf.Destroy()
			for range 50 {
				n, err := k.OpenTo(buf.Bytes(), "vol-1", sealed)
				if err == nil && !bytes.Equal(buf.Bytes()[:n], secret) {
					err = errors.New("wrong plaintext")
				}
				if err != nil {
					errs <- err
					return
				}
				buf.Wipe()
			}
			errs <- nil
		}()
	}
	for range 16 {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
}

func allZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}
