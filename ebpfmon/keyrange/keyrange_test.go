package keyrange_test

import (
	"os"
	"slices"
	"testing"

	"github.com/awnumar/memguard"

	"github.com/keygate/keygate/ebpfmon/keyrange"
)

func TestRegistry(t *testing.T) {
	page := uint64(os.Getpagesize())
	tests := []struct {
		name       string
		start, end uint64
		want       keyrange.Range
	}{
		{"aligned", 4 * page, 5 * page, keyrange.Range{Start: 4 * page, End: 5 * page}},
		{"widened to pages", 4*page + 10, 4*page + 20, keyrange.Range{Start: 4 * page, End: 5 * page}},
		{"spanning a boundary", 5*page - 1, 5*page + 1, keyrange.Range{Start: 4 * page, End: 6 * page}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var r keyrange.Registry
			var seen [][]keyrange.Range
			stop := r.Watch(func(rs []keyrange.Range) { seen = append(seen, rs) })
			remove := r.AddRange(tc.start, tc.end)
			if got := r.Ranges(); len(got) != 1 || got[0] != tc.want {
				t.Fatalf("ranges %v, want [%v]", got, tc.want)
			}
			remove()
			remove()
			stop()
			r.AddRange(0, page) // not seen: the watcher stopped
			want := [][]keyrange.Range{{}, {tc.want}, {}}
			if !slices.EqualFunc(seen, want, func(a, b []keyrange.Range) bool { return slices.Equal(a, b) }) {
				t.Errorf("watcher saw %v, want %v", seen, want)
			}
		})
	}
}

func TestRegisterLockedBuffer(t *testing.T) {
	b := memguard.NewBufferRandom(64)
	defer b.Destroy()
	unregister := keyrange.Register(b.Bytes())
	defer unregister()
	if keyrange.Register(nil) == nil {
		t.Error("Register(nil) returned no func")
	}
	rs := keyrange.Default.Ranges()
	if len(rs) != 1 {
		t.Fatalf("ranges %v, want the one buffer", rs)
	}
	addr := uint64(uintptrOf(b.Bytes()))
	if addr < rs[0].Start || addr+64 > rs[0].End {
		t.Errorf("range %v does not cover the buffer at %#x", rs[0], addr)
	}
}
