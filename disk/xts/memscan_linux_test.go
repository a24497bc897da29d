package xts

import (
	"bytes"
	"errors"
	"testing"

	"github.com/keygate/keygate/internal/memscan"
	"github.com/keygate/keygate/internal/testutil"
)

// TestScheduleOnlyInLockedMemory scans every readable mapping of the test
// process for round keys and fails if one appears anywhere but the locked
// buffer: not on the Go heap, not on a stack, not in a signal frame left
// behind by the assembly. It uses round keys 5 of enc1, dec1 and enc2,
// which no caller-side copy of the key contains. The needles are kept
// complemented, so the test itself holds no plain copy.
func TestScheduleOnlyInLockedMemory(t *testing.T) {
	forEachImpl(t, func(t *testing.T, im impl) {
		key := make([]byte, 64)
		for i := range key {
			key[i] = byte(i*37 + 11)
		}
		c := newTestCipher(t, key, im)
		buf := make([]byte, parallelMin) // big enough for the multi-core path
		for range 2 {
			c.EncryptSectors(buf, buf, 4096, 8, 8)
			c.DecryptSectors(buf, buf, 512, 1, 1)
		}
		var needles []memscan.Needle
		for _, rk := range []struct {
			name string
			off  int
		}{{"enc1 round key 5", offEnc1 + 5*16}, {"dec1 round key 5", offDec1 + 5*16}, {"enc2 round key 5", offEnc2 + 5*16}} {
			needles = append(needles, memscan.NewNeedle(rk.name, c.ks[rk.off:rk.off+16]))
		}
		for _, h := range scanProcess(t, c, needles).Hits {
			t.Errorf("round key found outside the locked buffer: %v", h)
		}
	})
}

// TestMemoryScanFindsLeak proves the scan above can fail: it copies a
// round key onto the heap on purpose (with a key no other test uses) and
// expects the scan to find that copy.
func TestMemoryScanFindsLeak(t *testing.T) {
	key := bytes.Repeat([]byte{0x5c}, 32)
	c := newTestCipher(t, key, bestImpl())
	// A heap object: a stack copy could move while the scan runs.
	leak := bytes.Clone(c.ks[offEnc1+5*16 : offEnc1+6*16])
	defer clear(leak)
	nd := memscan.NewNeedle("enc1 round key 5", c.ks[offEnc1+5*16:offEnc1+6*16])
	res := scanProcess(t, c, []memscan.Needle{nd})
	if len(res.At(memscan.RangeOf(leak))) == 0 {
		t.Fatalf("the scan missed a round key planted on the heap at %p (hits: %v)", &leak[0], res.Hits)
	}
}

// scanProcess scans the process outside the locked schedule buffer.
func scanProcess(t *testing.T, c *Cipher, needles []memscan.Needle) *memscan.Result {
	t.Helper()
	res, err := memscan.Scan(needles, memscan.RangeOf(c.buf.buf.Bytes()))
	if errors.Is(err, memscan.ErrUnavailable) {
		testutil.Skip(t, "procmem", err.Error())
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("scanned %d MiB in %d mappings", res.Scanned>>20, res.Mappings)
	return res
}
