package xts

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"strconv"
	"strings"
	"testing"
	"unsafe"
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
		var needles [][16]byte
		for _, off := range []int{offEnc1 + 5*16, offDec1 + 5*16, offEnc2 + 5*16} {
			var n [16]byte
			for i := range n {
				n[i] = ^c.ks[off+i]
			}
			needles = append(needles, n)
		}
		b := c.buf.Bytes()
		lo := uintptr(unsafe.Pointer(&b[0]))
		hits := scanProcess(t, needles, lo, lo+uintptr(len(b)))
		for _, h := range hits {
			t.Errorf("round key found outside the locked buffer at %#x (%s)", h.addr, h.region)
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
	var nd [16]byte
	for i := range nd {
		nd[i] = ^leak[i]
	}
	b := c.buf.Bytes()
	lo := uintptr(unsafe.Pointer(&b[0]))
	hits := scanProcess(t, [][16]byte{nd}, lo, lo+uintptr(len(b)))
	for _, h := range hits {
		if h.addr == uintptr(unsafe.Pointer(&leak[0])) {
			return
		}
	}
	t.Fatalf("the scan missed a round key planted on the heap at %p (hits: %v)", &leak[0], hits)
}

type hit struct {
	addr   uintptr
	region string
}

func scanProcess(t *testing.T, needles [][16]byte, skipLo, skipHi uintptr) []hit {
	t.Helper()
	maps, err := os.ReadFile("/proc/self/maps")
	if err != nil {
		t.Skipf("cannot read /proc/self/maps: %v", err)
	}
	mem, err := os.Open("/proc/self/mem")
	if err != nil {
		t.Skipf("cannot open /proc/self/mem: %v", err)
	}
	defer mem.Close()
	chunk := make([]byte, 1<<20)
	var hits []hit
	var scanned uintptr
	sc := bufio.NewScanner(bytes.NewReader(maps))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) < 2 || f[1][0] != 'r' {
			continue
		}
		a, b, _ := strings.Cut(f[0], "-")
		start, err1 := strconv.ParseUint(a, 16, 64)
		end, err2 := strconv.ParseUint(b, 16, 64)
		if err1 != nil || err2 != nil {
			t.Fatalf("bad maps line %q", sc.Text())
		}
		name := strings.Join(f[5:], " ")
		if name == "[vvar]" || name == "[vsyscall]" || strings.HasPrefix(name, "[vvar") {
			continue
		}
		for _, r := range [][2]uintptr{{uintptr(start), min(uintptr(end), skipLo)}, {max(uintptr(start), skipHi), uintptr(end)}} {
			for addr := r[0]; addr < r[1]; {
				n := min(uintptr(len(chunk)), r[1]-addr)
				got, _ := mem.ReadAt(chunk[:n], int64(addr))
				for _, nd := range needles {
					for _, i := range findComplemented(chunk[:got], nd) {
						hits = append(hits, hit{addr + uintptr(i), fmt.Sprintf("%s %s", f[0], name)})
					}
				}
				scanned += uintptr(got)
				if n <= 15 || got < int(n) {
					break
				}
				addr += n - 15 // overlap so a needle across chunks is found
			}
		}
	}
	clear(chunk) // it may hold a copy of whatever it found
	if scanned == 0 {
		t.Fatal("scanned no memory")
	}
	t.Logf("scanned %d MiB", scanned>>20)
	return hits
}

// findComplemented returns the offsets where ^nd occurs in b, without
// building ^nd.
func findComplemented(b []byte, nd [16]byte) []int {
	var at []int
	first := ^nd[0]
	for i := 0; i+16 <= len(b); i++ {
		j := bytes.IndexByte(b[i:len(b)-15], first)
		if j < 0 {
			break
		}
		i += j
		k := 1
		for k < 16 && b[i+k]^nd[k] == 0xff {
			k++
		}
		if k == 16 {
			at = append(at, i)
		}
	}
	return at
}
