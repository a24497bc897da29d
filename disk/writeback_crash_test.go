package disk_test

import (
	"bytes"
	"fmt"
	"os"
	"slices"
	"testing"

	"github.com/keygate/keygate/disk"
)

// TestCrashDuringWriteBack cuts the device's writes off at many points of
// a big write whose writeback starts in WriteAt and completes only at the
// next use of the filesystem (here the Sync), with writes to the file in
// between, one of them to a page the writeback is storing. The next boot
// must find /f as of its last Sync, as the writeback stored it, or as
// synced after (piece by piece, at one of those lengths: the writeback is
// not a Sync, so what it stored may survive alone), and e2fsck -fn clean.
func TestCrashDuringWriteBack(t *testing.T) {
	const size = 48 << 20
	const ss = 4096
	img := newImage(t, size)
	_, c := newKey(t)
	d := newDevice(t, img, size, ss, c)
	fsys := formatExt4(t, d, false)
	m0 := writeAndSync(t, fsys, nil, []fileOp{w(1, 0, 1<<20)})
	if err := fsys.Close(); err != nil {
		t.Fatal(err)
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	base, err := os.ReadFile(img.Name())
	if err != nil {
		t.Fatal(err)
	}
	// 16 MiB of pages: the writeback's threshold
	part1 := []fileOp{w(2, 0, 16<<20)}
	part2 := []fileOp{w(3, 100_000, 4096), w(3, 16<<20, 200_000)}

	// a run to the end counts the sectors, and shows the writeback in
	// flight while part2 is written
	d = crashDevice(t, img, base, ss, c, 1<<62)
	fsys = openFS(t, d)
	h, err := fsys.OpenFile("/f", os.O_RDWR)
	if err != nil {
		t.Fatal(err)
	}
	m1 := apply(t, h, bytes.Clone(m0), part1)
	m2 := apply(t, h, bytes.Clone(m1), part2)
	disk.WaitWriteBack(fsys) // its data goes out on a goroutine of its own
	started := disk.SectorsWritten(d)
	if in, _ := disk.FlushCounts(fsys); in != 0 || started < (16<<20)/ss {
		t.Fatalf("after 16 MiB of writes: %d flushes complete, %d sectors written; want 0 and the data (a writeback in flight)", in, started)
	}
	if err := h.Sync(); err != nil {
		t.Fatal(err)
	}
	if in, whole := disk.FlushCounts(fsys); in != 2 || whole != 0 {
		t.Fatalf("flushes in place %d, whole-file %d; want 2 (the writeback, the Sync) and 0", in, whole)
	}
	if got := get(t, fsys, "/f"); !bytes.Equal(got, m2) {
		t.Fatal("/f differs from what was written")
	}
	total := disk.SectorsWritten(d)
	h.Close()

	// the cut points of a flush, and every one around the writeback's
	// completion (the end of its epoch B, the epochs after it)
	points := cutPoints(total, ss)
	for n := max(0, started-24); n < min(started+64, total); n++ {
		points = append(points, n)
	}
	slices.Sort(points)
	points = slices.Compact(points)
	for _, n := range points {
		d := crashDevice(t, img, base, ss, c, n)
		fsys := openFS(t, d)
		h, err := fsys.OpenFile("/f", os.O_RDWR)
		if err != nil {
			t.Fatal(err)
		}
		apply(t, h, nil, part1)
		apply(t, h, nil, part2)
		if err := h.Sync(); err == nil {
			t.Fatalf("cut after %d of %d sectors: Sync succeeded", n, total)
		}
		d2 := newDevice(t, img, size, ss, c)
		fsys2, err := disk.OpenFS(d2)
		if err != nil {
			t.Fatalf("cut after %d of %d sectors: open: %v", n, total, err)
		}
		if err := asOneOf(get(t, fsys2, "/f"), ss, m0, m1, m2); err != nil {
			t.Fatalf("cut after %d of %d sectors: /f %v", n, total, err)
		}
		fsckAt(t, fsys2, d2, fmt.Sprintf("cut after %d of %d sectors", n, total))
	}
}

// asOneOf checks that got has the length of one of models and that each
// of its pieces of ss bytes is that piece of one of them (zeros past a
// model's end).
func asOneOf(got []byte, ss int, models ...[]byte) error {
	if !slices.ContainsFunc(models, func(m []byte) bool { return len(m) == len(got) }) {
		return fmt.Errorf("has %d bytes, the length of none of the states written", len(got))
	}
	for off := 0; off < len(got); off += ss {
		g := got[off:min(off+ss, len(got))]
		if !slices.ContainsFunc(models, func(m []byte) bool {
			want := make([]byte, len(g))
			if off < len(m) {
				copy(want, m[off:])
			}
			return bytes.Equal(g, want)
		}) {
			return fmt.Errorf("sector at %d is none of the states written", off)
		}
	}
	return nil
}
