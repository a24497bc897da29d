package disk_test

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/keygate/keygate/disk"
	"github.com/keygate/keygate/disk/xts"
	"github.com/keygate/keygate/internal/testutil"
)

// renameTree is what every rename test volume starts with.
var renameTree = map[string][]byte{
	"a/f":              bytes.Repeat([]byte("the file f. "), 9000),
	"a/x":              []byte("old x"),
	"d/sub/inner/file": []byte("inner file"),
	"d/sub/g":          []byte("g"),
}

const (
	emptyDirs = "b e"
	// big gets bigFiles names: several blocks, which e2fsck -D indexes
	bigFiles = 150
	// full gets names of 12 bytes (20-byte records) until its one block
	// has no room for another 16-byte record: 49 at 1 KiB blocks, 203
	// at 4 KiB
	fullName = "full-%07d"
)

func bigName(i int) string {
	return fmt.Sprintf("file-with-a-name-long-enough-that-few-fit-in-one-block-%04d", i)
}

// renameVolume makes a volume holding renameTree, empty directories b and
// e, and if asked a directory big of bigFiles files and a directory full
// whose only block is full (of empty files). With bs 0 keygate's Mkfs makes it and FS writes the
// files (directories linear, as go-diskfs writes them); otherwise
// mkfs.ext4 -d does (metadata_csum, that block size) and e2fsck -D then
// indexes big (htree).
func renameVolume(t *testing.T, bs, ss int, big, full bool) (*disk.FS, *disk.Device, *os.File, *xts.Cipher) {
	t.Helper()
	const size = 16 << 20
	img := newImage(t, size)
	_, c := newKey(t)
	d := newDevice(t, img, size, ss, c)
	files := map[string][]byte{}
	for k, v := range renameTree {
		files[k] = v
	}
	dirs := strings.Fields(emptyDirs)
	if big {
		dirs = append(dirs, "big")
		for i := range bigFiles {
			files["big/"+bigName(i)] = []byte(bigName(i))
		}
	}
	if full {
		n := 203
		if bs == 1024 {
			n = 49
		}
		dirs = append(dirs, "full")
		for i := range n {
			files["full/"+fmt.Sprintf(fullName, i)] = nil // empty: FS adds it packed, with no temporary name
		}
	}
	if bs == 0 {
		fsys, err := disk.Mkfs(d, disk.Ext4, "RENAME")
		if err != nil {
			t.Fatal(err)
		}
		for _, dir := range append(dirs, "a", "d/sub/inner") {
			if err := fsys.Mkdir(dir); err != nil {
				t.Fatal(err)
			}
		}
		for _, k := range slices.Sorted(mapKeys(files)) {
			put(t, fsys, k, files[k])
		}
		return fsys, d, img, c
	}
	src := t.TempDir()
	for _, dir := range dirs {
		if err := os.MkdirAll(filepath.Join(src, dir), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	for k, v := range files {
		if err := os.MkdirAll(filepath.Join(src, path.Dir(k)), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(src, k), v, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	plain := filepath.Join(t.TempDir(), "plain.img")
	run(t, "mkfs.ext4", "-q", "-F", "-b", strconv.Itoa(bs), "-d", src, plain, strconv.Itoa(size>>10)+"k")
	// -D indexes every directory of more than one block; exit status 1
	// says it changed something
	if out, err := exec.Command(testutil.LookPath(t, "e2fsck"), "-fyD", plain).CombinedOutput(); err != nil {
		if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 1 {
			t.Fatalf("e2fsck -fyD: %v\n%s", err, out)
		}
	}
	if big && !strings.Contains(run(t, "debugfs", "-R", "stat /big", plain), "Flags: 0x81000") {
		t.Fatal("e2fsck -D did not index /big: the htree cases would test linear directories")
	}
	b, err := os.ReadFile(plain)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := d.WriteAt(b, 0); err != nil {
		t.Fatal(err)
	}
	return openFS(t, d), d, img, c
}

func mapKeys[V any](m map[string]V) func(func(string) bool) {
	return func(yield func(string) bool) {
		for k := range m {
			if !yield(k) {
				return
			}
		}
	}
}

func run(t *testing.T, tool string, args ...string) string {
	t.Helper()
	out, err := exec.Command(testutil.LookPath(t, tool), args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %v: %v\n%s", tool, args, err, out)
	}
	return string(out)
}

// plainCopy writes the volume's plaintext to a file the e2fsprogs tools
// can read.
func plainCopy(t *testing.T, fsys *disk.FS, d *disk.Device) string {
	t.Helper()
	if err := fsys.Sync(); err != nil {
		t.Fatal(err)
	}
	b := make([]byte, d.Size())
	if _, err := d.ReadAt(b, 0); err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(t.TempDir(), "plain.img")
	if err := os.WriteFile(p, b, 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// debugLs lists directory dir as debugfs sees it: name to inode, "." and
// ".." included.
func debugLs(t *testing.T, img, dir string) map[string]string {
	t.Helper()
	out := run(t, "debugfs", "-R", "ls -p "+dir, img)
	names := map[string]string{}
	for _, line := range strings.Split(out, "\n") {
		// /inode/mode/uid/gid/name/size/
		f := strings.Split(line, "/")
		if len(f) >= 7 && f[1] != "0" {
			names[f[5]] = f[1]
		}
	}
	return names
}

// debugSize is a file's or directory's size as debugfs sees it.
func debugSize(t *testing.T, img, p string) string {
	t.Helper()
	out := run(t, "debugfs", "-R", "stat "+p, img)
	for _, f := range strings.Fields(out[strings.Index(out, "Size: ")+6:]) {
		return f
	}
	return ""
}

// TestExt4Rename renames through disk.FS on volumes keygate made and on
// volumes mkfs.ext4 made (metadata_csum; 1 KiB and 4 KiB blocks; htree
// directories): the names move, the content stays, e2fsck -fn finds
// nothing, and debugfs lists what FS lists, with a moved directory's ".."
// pointing at its new parent.
func TestExt4Rename(t *testing.T) {
	testutil.LookPath(t, "debugfs")
	for _, tc := range []struct {
		name, from, to string
		htree          bool // the case is about big being an htree
		grows          string
	}{
		{name: "same directory", from: "a/f", to: "a/g"},
		{name: "across directories", from: "a/f", to: "b/f"},
		{name: "over a file", from: "a/f", to: "a/x"},
		{name: "over a file across directories", from: "d/sub/g", to: "a/x"},
		{name: "directory across", from: "d/sub", to: "b/sub"},
		{name: "directory in its parent", from: "d/sub", to: "d/sub2"},
		{name: "directory over an empty directory", from: "d/sub", to: "e"},
		{name: "into a full directory block", from: "a/f", to: "full/moved-here", grows: "full"},
		{name: "into an htree directory", from: "a/f", to: "big/moved-here", htree: true},
		{name: "out of an htree directory", from: "big/" + bigName(7), to: "a/out", htree: true},
		{name: "over a name in an htree directory", from: "a/f", to: "big/" + bigName(100), htree: true},
		{name: "within an htree directory", from: "big/" + bigName(1), to: "big/" + bigName(1) + "-renamed", htree: true},
		{name: "htree directory across", from: "big", to: "b/big", htree: true},
	} {
		for _, v := range []struct {
			name string
			bs   int
		}{{"keygate-mkfs", 0}, {"mkfs.ext4-1k", 1024}, {"mkfs.ext4-4k", 4096}} {
			if tc.htree && v.bs == 0 {
				continue // go-diskfs writes no htree
			}
			t.Run(tc.name+"/"+v.name, func(t *testing.T) {
				fsys, d, _, _ := renameVolume(t, v.bs, 4096, tc.htree, tc.grows != "")
				before := map[string][]byte{}
				walk(t, fsys, ".", before)
				var sizeBefore string
				if tc.grows != "" {
					sizeBefore = debugSize(t, plainCopy(t, fsys, d), "/"+tc.grows)
				}
				if err := fsys.Rename(tc.from, tc.to); err != nil {
					t.Fatal(err)
				}
				// what must be there now: everything under from moved to to,
				// to's old content gone
				want := map[string][]byte{}
				for k, v := range before {
					switch {
					case k == tc.to || strings.HasPrefix(k, tc.to+"/"):
					case k == tc.from || strings.HasPrefix(k, tc.from+"/"):
						want[tc.to+k[len(tc.from):]] = v
					default:
						want[k] = v
					}
				}
				// a fresh open reads what is on the disk, not a cache
				fsys2 := openFS(t, d)
				got := map[string][]byte{}
				walk(t, fsys2, ".", got)
				for k, v := range want {
					if g, ok := got[k]; !ok || !bytes.Equal(g, v) {
						t.Errorf("%s: missing or different after the rename (have it: %v)", k, ok)
					}
				}
				for k := range got {
					if _, ok := want[k]; !ok {
						t.Errorf("%s: there after the rename, should not be", k)
					}
				}
				fsck(t, fsys2, d)
				img := plainCopy(t, fsys2, d)
				for _, dir := range []string{path.Dir(tc.from), path.Dir(tc.to)} {
					ls := debugLs(t, img, "/"+dir)
					entries, err := fsys2.ReadDir(dir)
					if err != nil {
						t.Fatal(err)
					}
					var ours, theirs []string
					for _, e := range entries {
						ours = append(ours, e.Name)
					}
					for n := range ls {
						if n != "." && n != ".." {
							theirs = append(theirs, n)
						}
					}
					slices.Sort(ours)
					slices.Sort(theirs)
					if !slices.Equal(ours, theirs) {
						t.Errorf("/%s: FS lists %d names, debugfs %d", dir, len(ours), len(theirs))
					}
				}
				if fi, err := fsys2.Stat(tc.to); err == nil && fi.IsDir {
					parent := debugLs(t, img, "/"+path.Dir(tc.to))["."]
					if dd := debugLs(t, img, "/"+tc.to)[".."]; dd != parent {
						t.Errorf("/%s/.. is inode %s, want its new parent's %s", tc.to, dd, parent)
					}
				}
				if tc.grows != "" {
					if after := debugSize(t, img, "/"+tc.grows); after == sizeBefore {
						t.Errorf("/%s stayed %s bytes: the case did not need a new block", tc.grows, after)
					}
				}
			})
		}
	}
}

// walk reads every file under dir into files (directories as nil, empty
// files as empty).
func walk(t *testing.T, fsys *disk.FS, dir string, files map[string][]byte) {
	t.Helper()
	entries, err := fsys.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		p := path.Join(dir, e.Name)
		if e.IsDir {
			files[p] = nil
			walk(t, fsys, p, files)
			continue
		}
		if e.Size == 0 {
			files[p] = []byte{}
			continue
		}
		files[p] = get(t, fsys, p)
	}
}

// TestCrashDuringRename cuts the device's writes off at every sector a
// rename or a Put writes (a Put: creating its temporary file, go-diskfs
// writing the content into it, the rename over the name), with 4096- and
// 512-byte sectors, on a volume keygate made and on one mkfs.ext4 made
// (1 KiB blocks, metadata_csum, htree), then opens what is left as the
// next boot would: the tree must be exactly as before or as after (no
// temporary file left), every file complete, and e2fsck -fn must find
// nothing wrong: no block or inode leaked either.
func TestCrashDuringRename(t *testing.T) {
	newX := bytes.Repeat([]byte("new x "), 5000)
	for _, tc := range []struct {
		name, from, to string
		put            []byte // a Put of this to "to" instead of a rename
		htree, full    bool
	}{
		{name: "same directory", from: "a/f", to: "a/g"},
		{name: "over a file", from: "a/f", to: "d/sub/g"},
		{name: "directory across", from: "d/sub", to: "b/sub"},
		{name: "directory over an empty one", from: "d/sub", to: "e"},
		{name: "into a full directory block", from: "a/f", to: "full/moved-here", full: true},
		{name: "into an htree directory", from: "a/f", to: "big/moved-here", htree: true},
		{name: "put over a file", to: "a/x", put: newX},
		{name: "put a new file", to: "a/new", put: newX},
	} {
		for _, v := range []struct {
			name   string
			bs, ss int
		}{{"keygate-mkfs/4096", 0, 4096}, {"keygate-mkfs/512", 0, 512}, {"mkfs.ext4-1k/4096", 1024, 4096}, {"mkfs.ext4-1k/512", 1024, 512}} {
			if tc.htree && v.bs == 0 {
				continue
			}
			t.Run(tc.name+"/"+v.name, func(t *testing.T) {
				fsys, d, img, c := renameVolume(t, v.bs, v.ss, tc.htree, tc.full)
				crashEach(t, fsys, d, img, c, v.ss, func(before map[string][]byte) map[string][]byte {
					after := map[string][]byte{}
					for k, v := range before {
						switch {
						case tc.put != nil:
							after[k] = v
						case k == tc.to || strings.HasPrefix(k, tc.to+"/"):
						case k == tc.from || strings.HasPrefix(k, tc.from+"/"):
							after[tc.to+k[len(tc.from):]] = v
						default:
							after[k] = v
						}
					}
					if tc.put != nil {
						after[tc.to] = tc.put
					}
					return after
				}, func(fsys *disk.FS) error {
					if tc.put != nil {
						return fsys.Put(tc.to, bytes.NewReader(tc.put), int64(len(tc.put)))
					}
					return fsys.Rename(tc.from, tc.to)
				}, everySector)
			})
		}
	}
}

func everySector(total int64) []int64 {
	out := make([]int64, total)
	for n := range out {
		out[n] = int64(n)
	}
	return out
}

// crashEach runs op on the volume fsys (on d, over img) once to count the
// sectors it writes, then again from the same start for each cut point,
// the device's writes cut off after that many sectors, and opens what is
// left as the next boot would: the tree must be exactly as before or as
// want(before) says it is after (no temporary file left), and e2fsck -fn
// must find nothing wrong.
func crashEach(t *testing.T, fsys *disk.FS, d *disk.Device, img *os.File, c *xts.Cipher, ss int,
	want func(before map[string][]byte) map[string][]byte, op func(*disk.FS) error, points func(total int64) []int64) {
	t.Helper()
	before := map[string][]byte{}
	walk(t, fsys, ".", before)
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
	after := want(before)
	d = crashDevice(t, img, base, ss, c, 1<<62)
	if err := op(openFS(t, d)); err != nil {
		t.Fatal(err)
	}
	total := disk.SectorsWritten(d)
	cuts := points(total)
	t.Logf("%d sectors written, cut after %d points", total, len(cuts))
	for _, n := range cuts {
		what := fmt.Sprintf("cut after %d of %d sectors", n, total)
		d := crashDevice(t, img, base, ss, c, n)
		if err := op(openFS(t, d)); err == nil {
			t.Fatalf("%s: the operation succeeded", what)
		}
		d2 := newDevice(t, img, int64(len(base))-segOff, ss, c)
		fsys2, err := disk.OpenFS(d2)
		if err != nil {
			t.Fatalf("%s: open: %v", what, err)
		}
		got := map[string][]byte{}
		walk(t, fsys2, ".", got)
		if !sameTree(got, before) && !sameTree(got, after) {
			t.Fatalf("%s: the tree is neither as before nor as after: %s", what, treeDiff(got, before, after))
		}
		fsckAt(t, fsys2, d2, what)
		d2.Close()
	}
}

func sameTree(a, b map[string][]byte) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if w, ok := b[k]; !ok || !bytes.Equal(v, w) {
			return false
		}
	}
	return true
}

// treeDiff names what got has that neither before nor after has, and
// what both have that got lacks.
func treeDiff(got, before, after map[string][]byte) string {
	var out []string
	for k, v := range got {
		b, okb := before[k]
		a, oka := after[k]
		if !(okb && bytes.Equal(v, b)) && !(oka && bytes.Equal(v, a)) {
			out = append(out, fmt.Sprintf("%s (%d bytes) is in neither", k, len(v)))
		}
	}
	for k := range before {
		if _, ok := got[k]; !ok {
			if _, ok := after[k]; ok {
				out = append(out, k+" is missing")
			}
		}
	}
	slices.Sort(out)
	return strings.Join(out, "; ")
}

// TestCrashDuringMkdir cuts the device's writes off at every sector a
// Mkdir writes, as TestCrashDuringRename does: after the repair open the
// tree must be as before or with the new empty directory, and e2fsck -fn
// must find nothing wrong.
func TestCrashDuringMkdir(t *testing.T) {
	for _, v := range []struct {
		name   string
		bs, ss int
	}{{"keygate-mkfs/4096", 0, 4096}, {"keygate-mkfs/512", 0, 512}, {"mkfs.ext4-1k/4096", 1024, 4096}, {"mkfs.ext4-1k/512", 1024, 512}} {
		for _, dir := range []string{"a/newdir", "full/newdir"} {
			t.Run(dir+"/"+v.name, func(t *testing.T) {
				fsys, d, img, c := renameVolume(t, v.bs, v.ss, false, true)
				crashEach(t, fsys, d, img, c, v.ss, func(before map[string][]byte) map[string][]byte {
					after := map[string][]byte{dir: nil}
					for k, v := range before {
						after[k] = v
					}
					return after
				}, func(fsys *disk.FS) error {
					// go-diskfs's writes stay in the Device's cache until a Sync
					if err := fsys.Mkdir(dir); err != nil {
						return err
					}
					return fsys.Sync()
				}, everySector)
			})
		}
	}
}

// TestCrashDuringBigPut is TestCrashDuringRename's Put over a file with
// content that go-diskfs allocates in two goes (its 4 MiB chunks), so
// that Put's record lists blocks from more than one bitmap write. With
// 4096-byte sectors (TestCrashDuringRename's small Puts cut 512-byte ones)
// it cuts at every sector of the first 40 (the temporary file's create,
// the first allocation) and of the last 48 (the second allocation, the
// rename: about 30 sectors), and at every 128th of the first chunk's data
// between.
func TestCrashDuringBigPut(t *testing.T) {
	content := bytes.Repeat([]byte("big put "), (4<<20+8<<10)/8)
	for _, v := range []struct {
		name string
		bs   int
	}{{"keygate-mkfs", 0}, {"mkfs.ext4-1k", 1024}} {
		t.Run(v.name, func(t *testing.T) {
			fsys, d, img, c := renameVolume(t, v.bs, 4096, false, false)
			crashEach(t, fsys, d, img, c, 4096, func(before map[string][]byte) map[string][]byte {
				after := map[string][]byte{"a/x": content}
				for k, v := range before {
					if k != "a/x" {
						after[k] = v
					}
				}
				return after
			}, func(fsys *disk.FS) error {
				return fsys.Put("a/x", bytes.NewReader(content), int64(len(content)))
			}, func(total int64) []int64 {
				var out []int64
				for n := int64(0); n < total; n++ {
					if n < 40 || n >= total-48 || n%128 == 0 {
						out = append(out, n)
					}
				}
				return out
			})
		})
	}
}
