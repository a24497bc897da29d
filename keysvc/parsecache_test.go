package keysvc

import (
	"errors"
	"fmt"
	"testing"
)

// TestParseCache checks that the cache returns what the parse returns,
// never keeps a failure, and stays within its bounds.
func TestParseCache(t *testing.T) {
	calls := 0
	parse := func(b []byte) (string, error) {
		calls++
		if string(b) == "bad" {
			return "", errors.New("bad input")
		}
		return "parsed:" + string(b), nil
	}
	for _, tc := range []struct {
		name                 string
		maxEntries, maxBytes int
		inputs               []string
		wantCalls            int
		wantMaxLen           int
	}{
		{"repeat is cached", 10, 1 << 10, []string{"a", "a", "a", "b", "b"}, 2, 2},
		{"failures are not", 10, 1 << 10, []string{"bad", "bad", "a", "a"}, 3, 1},
		{"entry bound", 2, 1 << 10, []string{"a", "b", "c", "d", "e"}, 5, 2},
		{"byte bound", 100, 4, []string{"aa", "bb", "cc", "dd"}, 4, 2},
		{"too long is parsed every time", 10, 1 << 10, []string{"0123456789abcdef0", "0123456789abcdef0"}, 2, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			calls = 0
			c := newParseCache[string](tc.maxEntries, tc.maxBytes, 16)
			for _, in := range tc.inputs {
				got, err := c.get([]byte(in), parse)
				want, wantErr := parse([]byte(in))
				calls--
				if got != want || fmt.Sprint(err) != fmt.Sprint(wantErr) {
					t.Fatalf("get(%q) = %q, %v; parse gives %q, %v", in, got, err, want, wantErr)
				}
				if len(c.m) > tc.maxEntries || c.size > tc.maxBytes {
					t.Fatalf("%d entries, %d bytes: over the bounds %d, %d", len(c.m), c.size, tc.maxEntries, tc.maxBytes)
				}
			}
			if calls != tc.wantCalls || len(c.m) > tc.wantMaxLen {
				t.Fatalf("%d parses and %d entries, want %d parses and at most %d entries", calls, len(c.m), tc.wantCalls, tc.wantMaxLen)
			}
		})
	}
}
