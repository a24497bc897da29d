package disk_test

import (
	"bytes"
	"fmt"
	mrand "math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/keygate/keygate/disk"
	"github.com/keygate/keygate/disk/xts"
	"github.com/keygate/keygate/internal/testutil"
)

// fileOp is a write (data at off) or, with data nil, a truncation to off.
type fileOp struct {
	off  int64
	data []byte
}

func w(seed uint64, off, n int64) fileOp {
	b := make([]byte, n)
	mrand.NewChaCha8([32]byte{byte(seed), byte(off), byte(off >> 8), byte(off >> 16)}).Read(b)
	return fileOp{off: off, data: b}
}

func trunc(n int64) fileOp { return fileOp{off: n} }

// apply runs ops on h and on the model, and returns the model.
func apply(t *testing.T, h *disk.File, model []byte, ops []fileOp) []byte {
	t.Helper()
	for _, op := range ops {
		if op.data == nil {
			if err := h.Truncate(op.off); err != nil {
				t.Fatal(err)
			}
			if n := int(op.off); n < len(model) {
				model = model[:n]
			} else {
				model = append(model, make([]byte, n-len(model))...)
			}
			continue
		}
		if _, err := h.WriteAt(op.data, op.off); err != nil {
			t.Fatal(err)
		}
		if end := int(op.off) + len(op.data); end > len(model) {
			model = append(model, make([]byte, end-len(model))...)
		}
		copy(model[op.off:], op.data)
	}
	return model
}

func holes(seed uint64, n int, every int64) []fileOp {
	var ops []fileOp
	for i := range n {
		ops = append(ops, w(seed, int64(i)*every, 4096))
	}
	return ops
}

// TestCrashDuringFlush cuts the device's writes off at many points of the
// flush of one file (the Sync after the case's writes), with 4096- and
// 512-byte sectors (a cut pwrite tears at a sector), and on a volume
// mkfs.ext4 made (metadata_csum, 1 KiB blocks), then opens what is left
// as the next boot would: the file must be as of its last Sync or newer
// (each sector or block old or new, its length old or new), and e2fsck -fn
// must find nothing wrong. Every case must go in place, not through the
// whole-file path, or it would test the wrong thing.
func TestCrashDuringFlush(t *testing.T) {
	const size = 12 << 20
	for _, tc := range []struct {
		name       string
		before, op []fileOp
	}{
		{"overwrite in place", []fileOp{w(1, 0, 1<<20)}, []fileOp{w(2, 100_000, 4096), w(2, 700_000, 4096), w(2, 300_000, 20_000)}},
		{"append", []fileOp{w(1, 0, 200_000)}, []fileOp{w(2, 200_000, 300_000)}},
		{"first write of a new file", nil, []fileOp{w(2, 0, 500_000)}},
		{"holes need a leaf block", nil, holes(2, 8, 256<<10)},
		{"grow a leaf tree", holes(1, 8, 256<<10), []fileOp{w(2, 100_000, 4096), w(2, 3_000_000, 4096), w(2, 5_000_000, 70_000)}},
		{"leaf tree back to inline", holes(1, 8, 256<<10), []fileOp{trunc(300_000)}},
		{"truncate then grow", []fileOp{w(1, 0, 1<<20)}, []fileOp{trunc(100_001), w(2, 400_000, 10_000)}},
		{"truncate to zero", []fileOp{w(1, 0, 300_000)}, []fileOp{trunc(0)}},
		{"grow with a hole", []fileOp{w(1, 0, 5000)}, []fileOp{trunc(90_000), w(2, 200_000, 100)}},
	} {
		for _, v := range []struct {
			name string
			ss   int
			mkfs bool // formatted by mkfs.ext4: metadata_csum, 1 KiB blocks at this size
		}{{"go-diskfs/4096", 4096, false}, {"go-diskfs/512", 512, false}, {"mkfs.ext4/4096", 4096, true}} {
			ss := v.ss
			unit := ss // what may be old or new: a sector, or a smaller block
			if v.mkfs {
				unit = 1024
			}
			t.Run(tc.name+"/"+v.name, func(t *testing.T) { crashFlush(t, size, ss, v.mkfs, unit, tc.before, tc.op) })
		}
	}
}

// TestCrashAllocatingUninitGroup cuts a flush whose new blocks need group
// 1, which mkfs.ext4 left BLOCK_UNINIT (its bitmap block never written),
// as groups 0 and 2 together are too small: the flush initialises the
// group itself rather than storing the whole file again (which would not
// fit), and every cut still opens as before or after with e2fsck clean
// (the group's flag, bitmap and checksum agree whichever of them a crash
// kept).
func TestCrashAllocatingUninitGroup(t *testing.T) {
	// 24 MiB: 1 KiB blocks, 8 MiB groups; group 1 is BLOCK_UNINIT
	const size = 24 << 20
	for _, ss := range []int{4096, 512} {
		t.Run(fmt.Sprint(ss), func(t *testing.T) {
			crashFlush(t, size, ss, true, 1024, []fileOp{w(1, 0, 1<<20)}, []fileOp{w(2, 1<<20, 13<<20)})
		})
	}
}

// crashFlush formats a volume of size bytes in sectors of ss (with
// mkfs.ext4 when mkfs is set), writes and syncs before, then cuts the
// writes of the flush of op at many points and checks what the next
// writable open finds: /f as of before or op, piece by piece of unit
// bytes, the flush in place, and e2fsck -fn clean.
func crashFlush(t *testing.T, size int64, ss int, mkfs bool, unit int, before, op []fileOp) {
	img := newImage(t, size)
	_, c := newKey(t)
	d := newDevice(t, img, size, ss, c)
	fsys := formatExt4(t, d, mkfs)
	old := writeAndSync(t, fsys, nil, before)
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

	// a run to the end counts the sectors the flush writes
	d = crashDevice(t, img, base, ss, c, 1<<62)
	fsys = openFS(t, d)
	nw := writeAndSync(t, fsys, old, op)
	total := disk.SectorsWritten(d)
	if in, whole := disk.FlushCounts(fsys); in != 1 || whole != 0 {
		t.Fatalf("flushes in place %d, whole-file %d; want 1 and 0", in, whole)
	}
	for _, n := range cutPoints(total, ss) {
		d := crashDevice(t, img, base, ss, c, n)
		fsys := openFS(t, d)
		h, err := fsys.OpenFile("/f", os.O_RDWR)
		if err != nil {
			t.Fatal(err)
		}
		apply(t, h, nil, op)
		if err := h.Sync(); err == nil {
			t.Fatalf("cut after %d of %d sectors: Sync succeeded", n, total)
		}
		// the next boot: a fresh device on what reached the file
		d2 := newDevice(t, img, size, ss, c)
		fsys2, err := disk.OpenFS(d2)
		if err != nil {
			t.Fatalf("cut after %d of %d sectors: open: %v", n, total, err)
		}
		if err := asOldOrNew(get(t, fsys2, "/f"), old, nw, unit); err != nil {
			t.Fatalf("cut after %d of %d sectors: /f %v", n, total, err)
		}
		fsckAt(t, fsys2, d2, fmt.Sprintf("cut after %d of %d sectors", n, total))
	}
}

// formatExt4 makes ext4 on d with go-diskfs, or with mkfs.ext4 (on a
// plain file, copied in through d).
func formatExt4(t *testing.T, d *disk.Device, mkfs bool) *disk.FS {
	t.Helper()
	if !mkfs {
		fsys, err := disk.Mkfs(d, disk.Ext4, "CRASH")
		if err != nil {
			t.Fatal(err)
		}
		return fsys
	}
	plain := filepath.Join(t.TempDir(), "plain.img")
	if err := os.WriteFile(plain, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(plain, d.Size()); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command(testutil.LookPath(t, "mkfs.ext4"), "-q", "-F", plain).CombinedOutput(); err != nil {
		t.Fatalf("mkfs.ext4: %v\n%s", err, out)
	}
	b, err := os.ReadFile(plain)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := d.WriteAt(b, 0); err != nil {
		t.Fatal(err)
	}
	fsys, err := disk.OpenFS(d)
	if err != nil {
		t.Fatal(err)
	}
	return fsys
}

// writeAndSync opens /f (creating it), applies ops over the model and syncs.
func writeAndSync(t *testing.T, fsys *disk.FS, model []byte, ops []fileOp) []byte {
	t.Helper()
	h, err := fsys.OpenFile("/f", os.O_RDWR|os.O_CREATE)
	if err != nil {
		t.Fatal(err)
	}
	model = apply(t, h, bytes.Clone(model), ops)
	if err := h.Sync(); err != nil {
		t.Fatal(err)
	}
	if err := h.Close(); err != nil {
		t.Fatal(err)
	}
	return model
}

// crashDevice restores the image to base and returns a device on it that
// writes n sectors and then no more.
func crashDevice(t *testing.T, img *os.File, base []byte, ss int, c *xts.Cipher, n int64) *disk.Device {
	t.Helper()
	if _, err := img.WriteAt(base, 0); err != nil {
		t.Fatal(err)
	}
	d := newDevice(t, img, int64(len(base))-segOff, ss, c)
	disk.CutWritesAfter(d, n)
	return d
}

func openFS(t *testing.T, d *disk.Device) *disk.FS {
	t.Helper()
	fsys, err := disk.OpenFS(d)
	if err != nil {
		t.Fatal(err)
	}
	return fsys
}

// cutPoints are where to cut a flush of total sectors: every point when
// there are few, else 8 spread over the data and every one of the last
// tail, where the metadata goes (about 10 writes, 30 sectors at 512).
func cutPoints(total int64, ss int) []int64 {
	tail := int64(24)
	if ss < 4096 {
		tail = 40
	}
	var out []int64
	for n := int64(0); n < total-tail; n += (total-tail)/8 + 1 {
		out = append(out, n)
	}
	for n := max(0, total-tail); n < total; n++ {
		out = append(out, n)
	}
	return out
}

// asOldOrNew checks that got is old or nw, or a mix of their pieces of ss
// bytes at the length of either: what a crash between two syncs may
// leave, as a pwrite cut short tears at a sector, and blocks smaller than
// a sector are placed apart.
func asOldOrNew(got, old, nw []byte, ss int) error {
	if len(got) != len(old) && len(got) != len(nw) {
		return fmt.Errorf("has %d bytes, neither the %d synced before nor the %d after", len(got), len(old), len(nw))
	}
	pad := func(b []byte, off, n int) []byte {
		out := make([]byte, n)
		if off < len(b) {
			copy(out, b[off:])
		}
		return out
	}
	for off := 0; off < len(got); off += ss {
		g := got[off:min(off+ss, len(got))]
		if !bytes.Equal(g, pad(old, off, len(g))) && !bytes.Equal(g, pad(nw, off, len(g))) {
			return fmt.Errorf("sector at %d is neither the old nor the new content", off)
		}
	}
	return nil
}

// fsckAt is fsck with what the failure is about.
func fsckAt(t *testing.T, fsys *disk.FS, d *disk.Device, what string) {
	t.Helper()
	t.Run(what, func(t *testing.T) { fsck(t, fsys, d) })
	if t.Failed() {
		t.FailNow()
	}
}

// TestFlushCostsWhatChanged counts the sectors a Sync writes after a 4 KiB
// write into files of several sizes: in place, it is the same for all of
// them (the page written, and the inode), however big the file.
func TestFlushCostsWhatChanged(t *testing.T) {
	const size = 48 << 20
	for _, tc := range []struct {
		name string
		size int64
	}{{"64K", 64 << 10}, {"1M", 1 << 20}, {"16M", 16 << 20}} {
		t.Run(tc.name, func(t *testing.T) {
			img := newImage(t, size)
			_, c := newKey(t)
			d := newDevice(t, img, size, 4096, c)
			fsys, err := disk.Mkfs(d, disk.Ext4, "COST")
			if err != nil {
				t.Fatal(err)
			}
			model := writeAndSync(t, fsys, nil, []fileOp{w(1, 0, tc.size)})
			h, err := fsys.OpenFile("/f", os.O_RDWR)
			if err != nil {
				t.Fatal(err)
			}
			op := w(2, tc.size/2, 4096)
			model = apply(t, h, model, []fileOp{op})
			if err := fsys.Sync(); err != nil { // what an earlier flush left in the cache
				t.Fatal(err)
			}
			disk.CutWritesAfter(d, 1<<62) // counts from here
			if err := h.Sync(); err != nil {
				t.Fatal(err)
			}
			n := disk.SectorsWritten(d)
			if err := h.Close(); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(get(t, fsys, "/f"), model) {
				t.Fatal("the file differs from what was written")
			}
			if want := int64(pageSize4K + 1); n != want {
				t.Errorf("Sync after a 4 KiB write into a %s file wrote %d sectors, want %d (its 64 KiB page and its inode)", tc.name, n, want)
			}
		})
	}
}

// pageSize4K is the 64 KiB page a flush writes, in 4 KiB sectors.
const pageSize4K = 16

// TestInPlaceOnMkfsVolume flushes in place on volumes mkfs.ext4 made
// (metadata_csum, flex_bg, uninitialised groups, 1 KiB or 4 KiB blocks):
// the checksums of bitmaps, descriptors, inodes and extent leaves must
// all be what e2fsck expects.
func TestInPlaceOnMkfsVolume(t *testing.T) {
	mkfs := testutil.LookPath(t, "mkfs.ext4")
	for _, bs := range []string{"1024", "4096"} {
		t.Run("block-"+bs, func(t *testing.T) {
			const size = 64 << 20
			f := newImage(t, size)
			out, err := exec.Command(mkfs, "-q", "-F", "-b", bs, "-E", "offset="+fmt.Sprint(segOff), f.Name(), "64M").CombinedOutput()
			if err != nil {
				t.Fatalf("mkfs.ext4: %v\n%s", err, out)
			}
			d := newDevice(t, f, size, 4096, nil)
			fsys, err := disk.OpenFS(d)
			if err != nil {
				t.Fatal(err)
			}
			model := writeAndSync(t, fsys, nil, holes(1, 8, 256<<10)) // a leaf block
			model = writeAndSync(t, fsys, model, []fileOp{w(2, 100_000, 300_000), w(2, 9_000_000, 4096)})
			model = writeAndSync(t, fsys, model, []fileOp{trunc(150_001), w(3, 160_000, 5000)}) // back inline
			if in, whole := disk.FlushCounts(fsys); in != 3 || whole != 0 {
				t.Errorf("flushes in place %d, whole-file %d; want 3 and 0", in, whole)
			}
			if !bytes.Equal(get(t, fsys, "/f"), model) {
				t.Error("/f differs from what was written")
			}
			fsck(t, fsys, d)
		})
	}
}
