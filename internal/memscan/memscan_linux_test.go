package memscan

import (
	"bytes"
	"crypto/rand"
	"errors"
	"runtime"
	"syscall"
	"testing"
	"unsafe"

	"github.com/keygate/keygate/internal/testutil"
)

func scan(t *testing.T, needles []Needle, skip ...Range) *Result {
	t.Helper()
	res, err := Scan(needles, skip...)
	if errors.Is(err, ErrUnavailable) {
		testutil.Skip(t, "procmem", err.Error())
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("scanned %d MiB in %d mappings", res.Scanned>>20, res.Mappings)
	return res
}

// secret returns random bytes and a needle for them.
func secret(t *testing.T, n int) ([]byte, Needle) {
	b := make([]byte, n)
	rand.Read(b)
	return b, NewNeedle(t.Name(), b)
}

func addr(b []byte) uintptr { return uintptr(unsafe.Pointer(&b[0])) }

// TestScan plants secrets on the heap, in an mmap'd region across the
// scanner's 1 MiB read boundary, and in a skipped range, and expects
// exactly the first two to be found, once each.
func TestScan(t *testing.T) {
	heap, nh := secret(t, 32)
	region, err := syscall.Mmap(-1, 0, 3<<20, syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_PRIVATE|syscall.MAP_ANON)
	if err != nil {
		t.Fatal(err)
	}
	defer syscall.Munmap(region)
	// Which offset straddles a read boundary depends on where the region
	// starts relative to the mapping; plant at every MiB boundary.
	cross, nc := secret(t, 24)
	for off := 1 << 20; off < len(region); off += 1 << 20 {
		copy(region[off-10:], cross)
	}
	skipped, ns := secret(t, 16)
	res := scan(t, []Needle{nh, nc, ns}, RangeOf(skipped))
	var gotHeap, gotCross int
	for _, h := range res.Hits {
		switch {
		case h.Addr == addr(heap):
			gotHeap++
		case RangeOf(region).Contains(h.Addr):
			gotCross++
		case RangeOf(skipped).Contains(h.Addr):
			t.Errorf("hit in a skipped range: %v", h)
		}
	}
	if gotHeap != 1 || gotCross != 2 {
		t.Errorf("found the heap copy %d times (want 1) and the region copies %d times (want 2); hits: %v", gotHeap, gotCross, res.Hits)
	}
	runtime.KeepAlive(heap)
	runtime.KeepAlive(skipped)
}

// TestDerivedNeedles checks that Xor, SwapWords and Chunks find what they
// promise, and that a needle holds no plain copy of its secret.
func TestDerivedNeedles(t *testing.T) {
	s, n := secret(t, 40)
	if bytes.Contains(n.c, s[:8]) {
		t.Fatal("needle holds its secret in plain")
	}
	pad := make([]byte, len(s))
	swapped := make([]byte, len(s))
	for i := range s {
		pad[i] = s[i] ^ 0x36
		swapped[i] = s[i/4*4+3-i%4]
	}
	part := bytes.Clone(s[16:40])
	clear(s)
	needles := append([]Needle{n.Xor(0x36), n.SwapWords(4)}, n.Chunks(16)...)
	if len(needles) != 4 || needles[3].Len() != 24 {
		t.Fatalf("Chunks(16) of 40 bytes: %d pieces, the last %d bytes; want 2, 24", len(needles)-2, needles[3].Len())
	}
	res := scan(t, needles)
	want := map[string]uintptr{needles[0].Name: addr(pad), needles[1].Name: addr(swapped), needles[2].Name: 0, needles[3].Name: addr(part)}
	for name, at := range want {
		found := false
		for _, h := range res.Hits {
			found = found || (h.Needle == name && (at == 0 || h.Addr == at))
		}
		if at != 0 && !found {
			t.Errorf("%s not found at %#x; hits: %v", name, at, res.Hits)
		}
	}
	runtime.KeepAlive(pad)
	runtime.KeepAlive(swapped)
	runtime.KeepAlive(part)
}

func TestShortNeedle(t *testing.T) {
	if _, err := Scan([]Needle{NewNeedle("short", []byte("1234567"))}); err == nil {
		t.Error("a 7-byte needle was accepted")
	}
}
