package disk_test

import (
	"bytes"
	"fmt"
	"hash/fnv"
	mrand "math/rand/v2"
	"os"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/keygate/keygate/disk"
)

// TestWriteBackConcurrent writes a file big enough for several
// writebacks, each of which writes its pages on a goroutine of its own,
// while the writer also rewrites regions that writeback is storing (so
// that writeAt must copy the page, not change it under the writeback),
// two readers read finished regions through another handle and compare
// them with a mirror, and a third goroutine stats the file (which
// completes the writeback in flight, racing the writer). Run it with
// -race. At the end the file, synced, closed and read back, is the
// mirror, and e2fsck finds nothing wrong.
func TestWriteBackConcurrent(t *testing.T) {
	const region = 512 << 10
	const regions = 88 // 44 MiB: two writebacks and a part
	fsys, d := newFS(t, disk.Ext4, 96<<20)
	w, err := fsys.OpenFile("/f", os.O_RDWR|os.O_CREATE)
	if err != nil {
		t.Fatal(err)
	}
	r, err := fsys.OpenFile("/f", os.O_RDONLY)
	if err != nil {
		t.Fatal(err)
	}
	mirror := make([]byte, regions*region)
	locks := make([]sync.RWMutex, regions)
	var written atomic.Int64 // regions written once, from the start
	var done atomic.Bool
	errs := make(chan error, 8)

	var wg sync.WaitGroup
	for seed := range uint64(2) {
		wg.Go(func() {
			rng := mrand.New(mrand.NewPCG(seed, 1))
			buf := make([]byte, region)
			for !done.Load() {
				n := written.Load()
				if n == 0 {
					continue
				}
				k := rng.Int64N(n)
				off := rng.IntN(region - 1)
				l := 1 + rng.IntN(region-off)
				locks[k].RLock()
				got, err := r.ReadAt(buf[:l], k*region+int64(off))
				ok := bytes.Equal(buf[:got], mirror[k*region+int64(off):][:l])
				locks[k].RUnlock()
				if err != nil || got != l || !ok {
					errs <- fmt.Errorf("read %d bytes at %d: got %d, %v, matches the mirror: %v", l, k*region+int64(off), got, err, ok)
					return
				}
			}
		})
	}
	wg.Go(func() {
		for !done.Load() {
			if _, err := fsys.Stat("/f"); err != nil {
				errs <- err
				return
			}
		}
	})

	rng := mrand.New(mrand.NewPCG(7, 7))
	write := func(k int64, off, n int) {
		p := make([]byte, n)
		for i := range p {
			p[i] = byte(rng.Uint32())
		}
		locks[k].Lock()
		defer locks[k].Unlock()
		if _, err := w.WriteAt(p, k*region+int64(off)); err != nil {
			t.Error(err)
		}
		copy(mirror[k*region+int64(off):], p)
	}
	for k := range int64(regions) {
		write(k, 0, region)
		written.Store(k + 1)
		if k >= 8 && k%4 == 0 {
			// 3 MiB back: a region the writeback in flight is storing,
			// rewritten in part across one of its 64 KiB pages' edges
			write(k-6, 60<<10, 100<<10)
		}
	}
	done.Store(true)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	// the first writeback is complete once the second starts
	if in, whole := disk.FlushCounts(fsys); in < 1 || whole != 0 {
		t.Errorf("flushes in place %d, whole-file %d before Sync; want at least 1 writeback and 0", in, whole)
	}
	if err := w.Sync(); err != nil {
		t.Fatal(err)
	}
	if got := readAll(t, r); !bytes.Equal(got, mirror) {
		t.Error("the file read through the other handle differs from the mirror")
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	if err := r.Close(); err != nil {
		t.Fatal(err)
	}
	if got := get(t, fsys, "/f"); !bytes.Equal(got, mirror) {
		t.Error("/f read back after Close differs from the mirror")
	}
	fsck(t, fsys, d)
}

// TestWriteBackLeavesItsPagesAlone holds a writeback's goroutine before it
// writes its pages, rewrites part of one of them meanwhile, then lets it
// go: the pages it writes must be those it started with (writeAt writes a
// copy), and the file, synced, must have the rewrite.
func TestWriteBackLeavesItsPagesAlone(t *testing.T) {
	fsys, d := newFS(t, disk.Ext4, 64<<20)
	h, err := fsys.OpenFile("/f", os.O_RDWR|os.O_CREATE)
	if err != nil {
		t.Fatal(err)
	}
	release := make(chan struct{})
	var sums []uint64
	changed := -1
	disk.OnWriteBack(t, func(pages [][]byte, done bool) {
		if !done {
			for _, pg := range pages {
				sums = append(sums, hashOf(pg))
			}
			<-release
			return
		}
		for i, pg := range pages {
			if hashOf(pg) != sums[i] && changed < 0 {
				changed = i
			}
		}
	})
	mirror := randBytes(16 << 20) // the writeback's threshold
	for off := 0; off < len(mirror); off += 1 << 20 {
		if _, err := h.WriteAt(mirror[off:off+1<<20], int64(off)); err != nil {
			t.Fatal(err)
		}
	}
	again := randBytes(4096)
	if _, err := h.WriteAt(again, 100_000); err != nil {
		t.Fatal(err)
	}
	copy(mirror[100_000:], again)
	close(release)
	disk.WaitWriteBack(fsys)
	if len(sums) == 0 {
		t.Fatal("16 MiB of writes started no writeback")
	}
	if changed >= 0 {
		t.Errorf("page %d of the writeback changed while it was being written", changed)
	}
	if err := h.Close(); err != nil {
		t.Fatal(err)
	}
	if got := get(t, fsys, "/f"); !bytes.Equal(got, mirror) {
		t.Error("/f differs from what was written")
	}
	fsck(t, fsys, d)
}

func hashOf(b []byte) uint64 {
	h := fnv.New64a()
	h.Write(b)
	return h.Sum64()
}
