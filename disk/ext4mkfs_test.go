package disk_test

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/keygate/keygate/disk"
	"github.com/keygate/keygate/internal/testutil"
)

// lseek whences for sparse files (Linux).
const seekData, seekHole = 3, 4

// allocated is the bytes the sparse file f really holds: what was written.
func allocated(t testing.TB, f *os.File) int64 {
	t.Helper()
	fi, err := f.Stat()
	if err != nil {
		t.Fatal(err)
	}
	return fi.Sys().(*syscall.Stat_t).Blocks * 512
}

// ext4Metadata lists, from the superblock and GDT on d, the byte ranges of
// every group's bitmaps and inode table.
func ext4Metadata(t *testing.T, d *disk.Device) [][2]int64 {
	t.Helper()
	le := binary.LittleEndian
	sb := make([]byte, 1024)
	if _, err := d.ReadAt(sb, 1024); err != nil {
		t.Fatal(err)
	}
	bs := int64(1024) << le.Uint32(sb[0x18:])
	blocks := uint64(le.Uint32(sb[0x04:])) | uint64(le.Uint32(sb[0x150:]))<<32
	groups := int((blocks + uint64(le.Uint32(sb[0x20:])) - 1) / uint64(le.Uint32(sb[0x20:])))
	ds, itb := int(le.Uint16(sb[0xfe:])), int64(le.Uint32(sb[0x28:]))*int64(le.Uint16(sb[0x58:]))
	gdt := make([]byte, groups*ds)
	if _, err := d.ReadAt(gdt, bs); err != nil {
		t.Fatal(err)
	}
	var out [][2]int64
	for g := 0; g < groups; g++ {
		e := gdt[g*ds:]
		at := func(lo, hi int) int64 { return int64(le.Uint32(e[lo:])) + int64(le.Uint32(e[hi:]))<<32 }
		out = append(out, [2]int64{at(0x00, 0x20) * bs, bs}, [2]int64{at(0x04, 0x24) * bs, bs},
			[2]int64{at(0x08, 0x28) * bs, itb})
	}
	return out
}

// fsckSparse runs e2fsck -fn on the plaintext of a big, mostly unwritten
// volume without decrypting all of it: the copy holds the plaintext of
// every range written in the image and of all the ext4 metadata (where an
// unwritten block decrypts to garbage, as the kernel would see it), and
// holes elsewhere, which e2fsck never reads in free space.
func fsckSparse(t *testing.T, fsys *disk.FS, d *disk.Device, img *os.File) {
	t.Helper()
	e2fsck := testutil.LookPath(t, "e2fsck")
	if err := fsys.Sync(); err != nil {
		t.Fatal(err)
	}
	ranges := ext4Metadata(t, d)
	for off := int64(segOff); ; {
		data, err := img.Seek(off, seekData)
		if err != nil {
			break // ENXIO: no data after off
		}
		hole, err := img.Seek(data, seekHole)
		if err != nil {
			t.Fatal(err)
		}
		ranges = append(ranges, [2]int64{data - segOff, hole - data})
		off = hole
	}
	plain, err := os.Create(filepath.Join(t.TempDir(), "plain.img"))
	if err != nil {
		t.Fatal(err)
	}
	defer plain.Close()
	if err := plain.Truncate(d.Size()); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 4<<20)
	for _, r := range ranges {
		for off, end := r[0], min(r[0]+r[1], d.Size()); off < end; off += int64(len(buf)) {
			n := min(int64(len(buf)), end-off)
			if _, err := d.ReadAt(buf[:n], off); err != nil {
				t.Fatal(err)
			}
			if _, err := plain.WriteAt(buf[:n], off); err != nil {
				t.Fatal(err)
			}
		}
	}
	out, err := exec.Command(e2fsck, "-fn", plain.Name()).CombinedOutput()
	if err != nil {
		t.Fatalf("e2fsck -fn found problems: %v\n%s", err, out)
	}
}

// TestMkfsExt4Lazy makes ext4 on encrypted sparse volumes of several sizes:
// e2fsck passes on the plaintext (garbage in every unwritten block, as in
// a real image), creation writes at most a bound that does not grow with
// the size, and files then go in and out, spilling into groups mkfs left
// uninitialised, with e2fsck still clean after.
func TestMkfsExt4Lazy(t *testing.T) {
	for _, tc := range []struct {
		name      string
		size      int64
		maxBytes  int64 // written by Mkfs
		spill     int   // MiB written to spill out of group 0
		wholeFsck bool  // small enough to decrypt whole
	}{
		{"64M", 64 << 20, 8 << 20, 16, true},
		{"300M-short-last-group", 300 << 20, 16 << 20, 150, true},
		{"1G", 1 << 30, 48 << 20, 200, false},
		{"32G", 32 << 30, 160 << 20, 200, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			img := newImage(t, tc.size)
			_, c := newKey(t)
			d := newDevice(t, img, tc.size, 4096, c)
			fsys, err := disk.Mkfs(d, disk.Ext4, "LAZY")
			if err != nil {
				t.Fatal(err)
			}
			if got := allocated(t, img); got > tc.maxBytes {
				t.Errorf("mkfs wrote %d MiB, want at most %d MiB", got>>20, tc.maxBytes>>20)
			}
			check := func() {
				if tc.wholeFsck {
					fsck(t, fsys, d)
				} else {
					fsckSparse(t, fsys, d, img)
				}
			}
			check()

			big := randBytes(tc.spill << 20)
			put(t, fsys, "/big", big)
			if err := fsys.Mkdir("/d/e"); err != nil {
				t.Fatal(err)
			}
			for i := 0; i < 20; i++ {
				put(t, fsys, fmt.Sprintf("/d/e/f%d", i), bytes.Repeat([]byte{byte(i)}, 5000*i))
			}
			put(t, fsys, "/big2", big[:len(big)/2])
			if err := fsys.Remove("/d/e/f3"); err != nil {
				t.Fatal(err)
			}
			if err := fsys.Remove("/big"); err != nil {
				t.Fatal(err)
			}
			check()

			fsys, err = disk.OpenFS(d) // from the image, not memory
			if err != nil {
				t.Fatal(err)
			}
			if got := get(t, fsys, "/big2"); !bytes.Equal(got, big[:len(big)/2]) {
				t.Error("/big2 corrupted")
			}
			ls, err := fsys.ReadDir("/d/e")
			if err != nil || len(ls) != 19 {
				t.Fatalf("ls /d/e: %d entries, %v; want 19", len(ls), err)
			}
			if got := get(t, fsys, "/d/e/f7"); !bytes.Equal(got, bytes.Repeat([]byte{7}, 35000)) {
				t.Error("/d/e/f7 corrupted")
			}
			check()
		})
	}
}
