package ebpfmon

import (
	"bufio"
	"fmt"
	"io"
	"slices"
	"strconv"
	"strings"
)

// MaxRanges is how many ranges the kernel checks per process. More are
// merged (the closest neighbours first) into ranges that cover them all, so
// the check errs towards reporting an overlap, never towards missing one.
const MaxRanges = 64

// Range is a span of key pages, [Start, End).
type Range struct {
	Start, End uint64
}

func (r Range) String() string { return fmt.Sprintf("%x-%x", r.Start, r.End) }

// normalize sorts, drops empty ranges, merges overlapping and adjacent ones,
// and then merges the smallest gaps until at most max remain.
func normalize(rs []Range, max int) []Range {
	out := make([]Range, 0, len(rs))
	for _, r := range rs {
		if r.End > r.Start {
			out = append(out, r)
		}
	}
	slices.SortFunc(out, func(a, b Range) int {
		switch {
		case a.Start < b.Start:
			return -1
		case a.Start > b.Start:
			return 1
		}
		return 0
	})
	merged := out[:0]
	for _, r := range out {
		if n := len(merged); n > 0 && r.Start <= merged[n-1].End {
			merged[n-1].End = max64(merged[n-1].End, r.End)
			continue
		}
		merged = append(merged, r)
	}
	for len(merged) > max {
		best := 0
		for i := 1; i < len(merged)-1; i++ {
			if merged[i+1].Start-merged[i].End < merged[best+1].Start-merged[best].End {
				best = i
			}
		}
		merged[best].End = merged[best+1].End
		merged = slices.Delete(merged, best+1, best+2)
	}
	return merged
}

func max64(a, b uint64) uint64 {
	if a > b {
		return a
	}
	return b
}

// RangeUpdate is one line of the ranges protocol: add or remove a range.
type RangeUpdate struct {
	Remove bool
	Range  Range
}

// ParseRangeLine parses one line of the ranges protocol that `keygate
// monitor --ranges` reads (docs/monitor.md):
//
//	# comment, and blank lines, are ignored
//	7f3a1c000000-7f3a1c001000     add a key range (hex, [start, end), as in /proc/<pid>/maps)
//	+7f3a1c000000-7f3a1c001000    the same
//	-7f3a1c000000-7f3a1c001000    remove a range added before
//
// ok is false for a line that carries no update.
func ParseRangeLine(line string) (u RangeUpdate, ok bool, err error) {
	line = strings.TrimSpace(line)
	if i := strings.IndexByte(line, '#'); i >= 0 {
		line = strings.TrimSpace(line[:i])
	}
	if line == "" {
		return u, false, nil
	}
	switch line[0] {
	case '-':
		u.Remove = true
		line = line[1:]
	case '+':
		line = line[1:]
	}
	a, b, found := strings.Cut(line, "-")
	if !found {
		return u, false, fmt.Errorf("range %q: want START-END in hex, as in /proc/<pid>/maps", line)
	}
	start, err1 := strconv.ParseUint(strings.TrimPrefix(a, "0x"), 16, 64)
	end, err2 := strconv.ParseUint(strings.TrimPrefix(b, "0x"), 16, 64)
	if err1 != nil || err2 != nil {
		return u, false, fmt.Errorf("range %q: START and END must be hex numbers", line)
	}
	if end <= start {
		return u, false, fmt.Errorf("range %q: END must be above START", line)
	}
	u.Range = Range{start, end}
	return u, true, nil
}

// ReadRanges reads the ranges protocol from r, calling fn for each update,
// until r ends or fn or a line fails. A line number names a bad line.
func ReadRanges(r io.Reader, fn func(RangeUpdate) error) error {
	sc := bufio.NewScanner(r)
	for n := 1; sc.Scan(); n++ {
		u, ok, err := ParseRangeLine(sc.Text())
		if err != nil {
			return fmt.Errorf("line %d: %v", n, err)
		}
		if !ok {
			continue
		}
		if err := fn(u); err != nil {
			return fmt.Errorf("line %d: %w", n, err)
		}
	}
	return sc.Err()
}
