package keymem

import (
	"os"
	"slices"
	"sync"
	"unsafe"
)

// Range is a span of key pages, [Start, End), page-aligned.
type Range struct {
	Start, End uint64
}

// Registry holds the key ranges of one process. The zero value is ready.
type Registry struct {
	mu       sync.Mutex
	next     int
	ranges   map[int]Range
	watchers map[int]func([]Range)
}

// Default is the registry of this process, the one locked-buffer code adds to.
var Default = &Registry{}

// register adds b's pages to Default; only Buffer does, so that no key
// holder pairs the two steps by hand.
func register(b []byte) (unregister func()) { return Default.Add(b) }

// Add registers the pages that hold b and returns the func that removes them
// again; calling it more than once is harmless. An empty b registers nothing.
func (r *Registry) Add(b []byte) (remove func()) {
	if len(b) == 0 {
		return func() {}
	}
	start := uint64(uintptr(unsafe.Pointer(unsafe.SliceData(b))))
	return r.AddRange(start, start+uint64(len(b)))
}

// AddRange registers [start, end), widened to whole pages (the kernel hands
// out memory, and the monitor checks it, by the page).
func (r *Registry) AddRange(start, end uint64) (remove func()) {
	page := uint64(os.Getpagesize())
	rg := Range{start &^ (page - 1), (end + page - 1) &^ (page - 1)}
	r.mu.Lock()
	if r.ranges == nil {
		r.ranges = map[int]Range{}
	}
	id := r.next
	r.next++
	r.ranges[id] = rg
	r.notifyLocked()
	r.mu.Unlock()
	var once sync.Once
	return func() {
		once.Do(func() {
			r.mu.Lock()
			delete(r.ranges, id)
			r.notifyLocked()
			r.mu.Unlock()
		})
	}
}

// Ranges returns the registered ranges, sorted by start.
func (r *Registry) Ranges() []Range {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.rangesLocked()
}

func (r *Registry) rangesLocked() []Range {
	out := make([]Range, 0, len(r.ranges))
	for _, rg := range r.ranges {
		out = append(out, rg)
	}
	slices.SortFunc(out, func(a, b Range) int {
		if a.Start < b.Start {
			return -1
		} else if a.Start > b.Start {
			return 1
		}
		return 0
	})
	return out
}

// Watch calls fn with the whole set now and after every change, until stop is
// called. fn runs with the registry locked, so that updates reach it in
// order; it must not call back into the registry.
func (r *Registry) Watch(fn func([]Range)) (stop func()) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.watchers == nil {
		r.watchers = map[int]func([]Range){}
	}
	id := r.next
	r.next++
	r.watchers[id] = fn
	fn(r.rangesLocked())
	return func() {
		r.mu.Lock()
		delete(r.watchers, id)
		r.mu.Unlock()
	}
}

func (r *Registry) notifyLocked() {
	if len(r.watchers) == 0 {
		return
	}
	rs := r.rangesLocked()
	for _, fn := range r.watchers {
		fn(rs)
	}
}
