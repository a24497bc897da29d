package memscan

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"unsafe"
)

// MinNeedle is the shortest needle Scan accepts: shorter ones would match
// by chance in a few hundred MiB of memory.
const MinNeedle = 8

// ErrUnavailable means the process cannot read its own memory (no /proc,
// or a seccomp or LSM policy forbids it). Tests skip on it.
var ErrUnavailable = errors.New("memscan: cannot read this process's memory")

// Needle is a secret to look for, held complemented.
type Needle struct {
	Name string
	c    []byte // ^secret
}

// NewNeedle returns a needle for secret. It keeps a complemented copy;
// the caller wipes its plain one.
func NewNeedle(name string, secret []byte) Needle {
	c := make([]byte, len(secret))
	for i, b := range secret {
		c[i] = ^b
	}
	return Needle{Name: name, c: c}
}

// Len is the length of the secret.
func (n Needle) Len() int { return len(n.c) }

// Xor returns a needle for the secret with every byte XORed with x, as
// HMAC's pads (x = 0x36, 0x5c) are.
func (n Needle) Xor(x byte) Needle {
	c := make([]byte, len(n.c))
	for i, b := range n.c {
		c[i] = b ^ x // ^(s^x) == (^s)^x
	}
	return Needle{Name: fmt.Sprintf("%s^%#02x", n.Name, x), c: c}
}

// SwapWords returns a needle for the secret with the bytes of every w-byte
// word reversed: how a big-endian hash (SHA-1, SHA-2) holds its message
// words in a little-endian machine's memory. A trailing partial word is
// dropped.
func (n Needle) SwapWords(w int) Needle {
	c := make([]byte, 0, len(n.c))
	for i := 0; i+w <= len(n.c); i += w {
		for j := i + w - 1; j >= i; j-- {
			c = append(c, n.c[j])
		}
	}
	return Needle{Name: fmt.Sprintf("%s (%d-byte words swapped)", n.Name, w), c: c}
}

// Chunks splits the needle into pieces of size bytes (the last may be
// longer, up to 2*size-1), so that a partial copy is found too.
func (n Needle) Chunks(size int) []Needle {
	var out []Needle
	for i := 0; i < len(n.c); i += size {
		j := i + size
		if len(n.c)-j < size {
			j = len(n.c)
		}
		out = append(out, Needle{Name: fmt.Sprintf("%s[%d:%d]", n.Name, i, j), c: slices.Clone(n.c[i:j])})
		if j == len(n.c) {
			break
		}
	}
	return out
}

// Reveal writes the plain secret into dst, which the caller keeps in
// locked memory, and returns how many bytes it wrote. It is for a test
// that leaks the secret on purpose to prove its scan can fail.
func (n Needle) Reveal(dst []byte) int {
	k := min(len(dst), len(n.c))
	for i := range k {
		dst[i] = ^n.c[i]
	}
	return k
}

// Wipe zeroes the needle.
func (n Needle) Wipe() { clear(n.c) }

// Range is the address range [Lo, Hi).
type Range struct{ Lo, Hi uintptr }

// RangeOf is the range b occupies.
func RangeOf(b []byte) Range {
	if len(b) == 0 {
		return Range{}
	}
	lo := uintptr(unsafe.Pointer(unsafe.SliceData(b)))
	return Range{lo, lo + uintptr(len(b))}
}

// Contains reports whether addr is in r.
func (r Range) Contains(addr uintptr) bool { return r.Lo <= addr && addr < r.Hi }

// Hit is one place a needle was found.
type Hit struct {
	Needle  string
	Addr    uintptr
	Mapping string // its /proc/self/maps line: range, permissions, name
}

func (h Hit) String() string { return fmt.Sprintf("%s at %#x (%s)", h.Needle, h.Addr, h.Mapping) }

// Result is what a scan found, and how much memory it covered.
type Result struct {
	Hits     []Hit
	Scanned  uint64 // bytes read and searched
	Mappings int    // readable mappings searched
}

// At returns the hits inside r.
func (res *Result) At(r Range) []Hit {
	var in []Hit
	for _, h := range res.Hits {
		if r.Contains(h.Addr) {
			in = append(in, h)
		}
	}
	return in
}

const chunkSize = 1 << 20

// Scan searches every readable mapping of the process, except the skip
// ranges, for the needles. Memory is read through /proc/self/mem into a
// buffer mapped outside the Go heap (and itself skipped), which is wiped
// afterwards. Mappings that change under the scan are searched as far as
// they can be read. Other goroutines keep running meanwhile.
func Scan(needles []Needle, skip ...Range) (*Result, error) {
	if len(needles) == 0 {
		return nil, errors.New("memscan: no needles")
	}
	maxLen := 0
	var first [256][]int // needle indexes by complemented first byte
	for i, n := range needles {
		if len(n.c) < MinNeedle {
			return nil, fmt.Errorf("memscan: needle %q is %d bytes; use at least %d", n.Name, len(n.c), MinNeedle)
		}
		maxLen = max(maxLen, len(n.c))
		first[n.c[0]] = append(first[n.c[0]], i)
	}
	maps, err := os.ReadFile("/proc/self/maps")
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrUnavailable, err)
	}
	mem, err := os.Open("/proc/self/mem")
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrUnavailable, err)
	}
	defer mem.Close()
	buf, err := syscall.Mmap(-1, 0, chunkSize, syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_PRIVATE|syscall.MAP_ANON)
	if err != nil {
		return nil, fmt.Errorf("memscan: map scan buffer: %v", err)
	}
	defer syscall.Munmap(buf)
	defer clear(buf) // it may hold a copy of whatever it found
	skip = append(skip[:len(skip):len(skip)], RangeOf(buf))

	res := &Result{}
	page := uintptr(os.Getpagesize())
	sc := bufio.NewScanner(bytes.NewReader(maps))
	for sc.Scan() {
		line := sc.Text()
		f := strings.Fields(line)
		if len(f) < 5 || f[1][0] != 'r' {
			continue
		}
		name := strings.Join(f[5:], " ")
		if strings.HasPrefix(name, "[vvar") || name == "[vsyscall]" {
			continue // kernel pages that /proc/self/mem refuses
		}
		a, b, _ := strings.Cut(f[0], "-")
		start, err1 := strconv.ParseUint(a, 16, 64)
		end, err2 := strconv.ParseUint(b, 16, 64)
		if err1 != nil || err2 != nil {
			return nil, fmt.Errorf("memscan: bad maps line %q", line)
		}
		res.Mappings++
		for _, r := range subtract(Range{uintptr(start), uintptr(end)}, skip) {
			for addr := r.Lo; addr < r.Hi; {
				n := min(uintptr(len(buf)), r.Hi-addr)
				got, _ := mem.ReadAt(buf[:n], int64(addr))
				if got <= 0 {
					addr = (addr + page) &^ (page - 1) // unreadable page: go on after it
					continue
				}
				res.Scanned += uint64(got)
				last := addr+uintptr(got) >= r.Hi || got < int(n)
				// Report a match only where it starts before the next
				// read's overlap begins, so none is reported twice.
				limit := got
				if !last {
					limit = got - (maxLen - 1)
				}
				search(buf[:got], limit, needles, &first, func(i, at int) {
					res.Hits = append(res.Hits, Hit{needles[i].Name, addr + uintptr(at), line})
				})
				if last {
					if got < int(n) {
						addr = (addr + uintptr(got) + page) &^ (page - 1)
						continue
					}
					break
				}
				addr += uintptr(limit)
			}
		}
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("memscan: read maps: %v", err)
	}
	if res.Scanned == 0 {
		return nil, fmt.Errorf("%w: no mapping could be read", ErrUnavailable)
	}
	return res, nil
}

// search calls found for every needle that occurs in b at an offset below
// limit.
func search(b []byte, limit int, needles []Needle, first *[256][]int, found func(needle, at int)) {
	for at := 0; at < limit; at++ {
		cand := first[^b[at]]
		if cand == nil {
			continue
		}
		for _, i := range cand {
			c := needles[i].c
			if at+len(c) > len(b) {
				continue
			}
			k := 1
			for k < len(c) && b[at+k]^c[k] == 0xff {
				k++
			}
			if k == len(c) {
				found(i, at)
			}
		}
	}
}

// subtract returns r without the skip ranges, in order.
func subtract(r Range, skip []Range) []Range {
	out := []Range{r}
	for _, s := range skip {
		var next []Range
		for _, o := range out {
			if s.Hi <= o.Lo || s.Lo >= o.Hi {
				next = append(next, o)
				continue
			}
			if o.Lo < s.Lo {
				next = append(next, Range{o.Lo, s.Lo})
			}
			if s.Hi < o.Hi {
				next = append(next, Range{s.Hi, o.Hi})
			}
		}
		out = next
	}
	return out
}
