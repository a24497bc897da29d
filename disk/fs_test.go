package disk_test

import (
	"bytes"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	iofs "io/fs"
	mrand "math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/keygate/keygate/disk"
	"github.com/keygate/keygate/internal/testutil"
)

var fsTypes = []disk.FSType{disk.FAT32, disk.Ext4}

// newFS makes an encrypted device of size bytes with a fresh filesystem.
func newFS(t testing.TB, typ disk.FSType, size int64) (*disk.FS, *disk.Device) {
	return newFSSector(t, typ, size, 4096)
}

func newFSSector(t testing.TB, typ disk.FSType, size int64, ss int) (*disk.FS, *disk.Device) {
	t.Helper()
	f := newImage(t, size)
	_, c := newKey(t)
	d := newDevice(t, f, size, ss, c)
	fsys, err := disk.Mkfs(d, typ, "TESTVOL")
	if err != nil {
		t.Fatal(err)
	}
	return fsys, d
}

func randBytes(n int) []byte {
	b := make([]byte, n)
	rand.Read(b)
	return b
}

func get(t testing.TB, fsys *disk.FS, p string) []byte {
	t.Helper()
	var buf bytes.Buffer
	if _, err := fsys.Get(p, &buf); err != nil {
		t.Fatalf("get %s: %v", p, err)
	}
	return buf.Bytes()
}

func put(t testing.TB, fsys *disk.FS, p string, b []byte) {
	t.Helper()
	if err := fsys.Put(p, bytes.NewReader(b), int64(len(b))); err != nil {
		t.Fatalf("put %s: %v", p, err)
	}
}

// fsck checks the filesystem with the real tool, on a decrypted copy.
func fsck(t *testing.T, fsys *disk.FS, d *disk.Device) {
	t.Helper()
	typ := fsys.Type()
	if err := fsys.Sync(); err != nil {
		t.Fatal(err)
	}
	tool, args := "e2fsck", []string{"-fn"}
	if typ == disk.FAT32 {
		tool, args = "fsck.fat", []string{"-n"}
	}
	prog := testutil.LookPath(t, tool)
	if err := d.Flush(); err != nil {
		t.Fatal(err)
	}
	plain := make([]byte, d.Size())
	if _, err := d.ReadAt(plain, 0); err != nil {
		t.Fatal(err)
	}
	img := filepath.Join(t.TempDir(), "plain.img")
	if err := os.WriteFile(img, plain, 0o600); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(prog, append(args, img)...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %v found problems: %v\n%s", tool, args, err, out)
	}
}

func TestFSRoundTrip(t *testing.T) {
	sizes := []int{0, 1, 4095, 4096, 1<<20 + 1}
	for _, tc := range []struct {
		typ disk.FSType
		ss  int
	}{{disk.FAT32, 512}, {disk.FAT32, 4096}, {disk.Ext4, 512}, {disk.Ext4, 4096}} {
		typ := tc.typ
		t.Run(fmt.Sprintf("%s/sector-%d", typ, tc.ss), func(t *testing.T) {
			fsys, d := newFSSector(t, typ, 64<<20, tc.ss)
			if err := fsys.Mkdir("/a/b/c"); err != nil {
				t.Fatal(err)
			}
			if err := fsys.Mkdir("/a/b"); err != nil {
				t.Fatalf("mkdir of an existing directory: %v", err)
			}
			want := map[string][]byte{}
			for _, n := range sizes {
				p := fmt.Sprintf("/a/b/f%d.bin", n)
				want[p] = randBytes(n)
				put(t, fsys, p, want[p])
			}
			// unknown size, streamed
			want["/a/stream"] = randBytes(5<<20 + 3)
			if err := fsys.Put("/a/stream", io.MultiReader(bytes.NewReader(want["/a/stream"])), -1); err != nil {
				t.Fatal(err)
			}
			if err := fsys.Sync(); err != nil {
				t.Fatal(err)
			}
			// reopen from the device to prove it reached the image
			fsys, err := disk.OpenFS(d)
			if err != nil {
				t.Fatal(err)
			}
			if fsys.Type() != typ {
				t.Fatalf("OpenFS detected %s, want %s", fsys.Type(), typ)
			}
			for p, b := range want {
				if got := get(t, fsys, p); !bytes.Equal(got, b) {
					t.Errorf("%s: got %d bytes back, want the %d put", p, len(got), len(b))
				}
				fi, err := fsys.Stat(p)
				if err != nil || fi.Size != int64(len(b)) || fi.IsDir {
					t.Errorf("stat %s = %+v, %v", p, fi, err)
				}
			}
			ls, err := fsys.ReadDir("/a/b")
			if err != nil {
				t.Fatal(err)
			}
			names := map[string]bool{}
			for _, e := range ls {
				names[e.Name] = e.IsDir
			}
			if len(ls) != len(sizes)+1 || !names["c"] || names["f4096.bin"] {
				t.Errorf("ls /a/b = %+v", ls)
			}
			// overwrite with shorter content
			put(t, fsys, "/a/b/f4096.bin", []byte("short"))
			if got := get(t, fsys, "/a/b/f4096.bin"); string(got) != "short" {
				t.Errorf("after overwrite got %q", got)
			}
			for _, p := range []string{"/a/b/f1.bin", "/a/b/c", "/a/stream"} {
				if err := fsys.Remove(p); err != nil {
					t.Fatalf("remove %s: %v", p, err)
				}
				if _, err := fsys.Stat(p); !errors.Is(err, iofs.ErrNotExist) {
					t.Errorf("stat after remove %s: %v", p, err)
				}
			}
			fsck(t, fsys, d)
		})
	}
}

func TestFSErrors(t *testing.T) {
	for _, typ := range fsTypes {
		fsys, _ := newFS(t, typ, 40<<20)
		put(t, fsys, "/dir/../file", []byte("x"))
		if err := fsys.Mkdir("/dir/sub"); err != nil {
			t.Fatal(err)
		}
		for _, tc := range []struct {
			name, want string
			is         error
			op         func() error
		}{
			{"get-missing", "no such file", iofs.ErrNotExist, func() error { _, err := fsys.Get("/nope", io.Discard); return err }},
			{"stat-missing", "no such file", iofs.ErrNotExist, func() error { _, err := fsys.Stat("/dir/nope"); return err }},
			{"ls-missing", "does not exist", iofs.ErrNotExist, func() error { _, err := fsys.ReadDir("/nope"); return err }},
			{"rm-missing", "no such file", iofs.ErrNotExist, func() error { return fsys.Remove("/nope") }},
			{"rm-nonempty-dir", "not empty", disk.ErrNotEmpty, func() error { return fsys.Remove("/dir") }},
			{"rm-root", "root", nil, func() error { return fsys.Remove("/") }},
			{"put-missing-dir", "does not exist (create it with mkdir)", iofs.ErrNotExist, func() error {
				return fsys.Put("/nodir/f", strings.NewReader("x"), 1)
			}},
			{"put-over-dir", "directory is in the way", nil, func() error { return fsys.Put("/dir", strings.NewReader("x"), 1) }},
			{"put-short-input", "expected 10", nil, func() error { return fsys.Put("/short", strings.NewReader("x"), 10) }},
			{"get-dir", "is a directory", nil, func() error { _, err := fsys.Get("/dir", io.Discard); return err }},
			{"mkdir-through-file", "is a file", nil, func() error { return fsys.Mkdir("/file/sub") }},
		} {
			t.Run(string(typ)+"/"+tc.name, func(t *testing.T) {
				err := tc.op()
				if err == nil || !strings.Contains(err.Error(), tc.want) {
					t.Fatalf("error %v, want one containing %q", err, tc.want)
				}
				if tc.is != nil && !errors.Is(err, tc.is) {
					t.Errorf("error %v is not %v", err, tc.is)
				}
			})
		}
		if _, err := fsys.Stat("/short"); err == nil {
			t.Errorf("%s: a failed put left its partial file", typ)
		}
	}
}

// TestFSFullPutKeepsOldFile fills the filesystem and checks that a Put
// that does not fit fails with ErrNoSpace, saying what to do, and leaves
// the previous file at that path as it was; with a known size (checked
// up front) and with an unknown one (found out while writing).
func TestFSFullPutKeepsOldFile(t *testing.T) {
	for _, typ := range fsTypes {
		for _, known := range []bool{true, false} {
			t.Run(fmt.Sprintf("%s/known-size=%v", typ, known), func(t *testing.T) {
				fsys, d := newFS(t, typ, 48<<20)
				old := randBytes(3 << 20)
				put(t, fsys, "/victim", old)
				free, err := fsys.FreeSpace()
				if err != nil {
					t.Fatal(err)
				}
				big := randBytes(int(free) + 1<<20)
				size := int64(len(big))
				if !known {
					size = -1
				}
				err = fsys.Put("/victim", bytes.NewReader(big), size)
				if !errors.Is(err, disk.ErrNoSpace) || !strings.Contains(err.Error(), "remove files") {
					t.Fatalf("put of %d bytes with %d free: %v; want ErrNoSpace with advice", len(big), free, err)
				}
				if got := get(t, fsys, "/victim"); !bytes.Equal(got, old) {
					t.Fatal("the previous file did not survive the failed put")
				}
				if ls, _ := fsys.ReadDir("/"); len(ls) != 1 {
					t.Errorf("leftovers after the failed put: %+v", ls)
				}
				// the space came back: a fitting put still works
				put(t, fsys, "/victim", big[:1<<20])
				fsck(t, fsys, d)
			})
		}
	}
}

// TestExt4RemoveBitmaps is the regression test for go-diskfs #425: remove
// must free exactly the removed file's inode and blocks. The bug cleared
// inode+1's bitmap bit, so the next file reused a live inode and
// overwrote it, and miscounted free blocks.
func TestExt4RemoveBitmaps(t *testing.T) {
	fsys, d := newFS(t, disk.Ext4, 64<<20)
	want := map[string][]byte{}
	rng := mrand.New(mrand.NewPCG(4, 25))
	// the reproducer of the issue: a, b, c; remove b; add d
	for _, n := range []string{"a", "b", "c"} {
		want["/"+n] = bytes.Repeat([]byte(n), 4096)
		put(t, fsys, "/"+n, want["/"+n])
	}
	if err := fsys.Remove("/b"); err != nil {
		t.Fatal(err)
	}
	delete(want, "/b")
	want["/d"] = bytes.Repeat([]byte("d"), 4096)
	put(t, fsys, "/d", want["/d"])
	// then many more, in a directory tree, with removals in between
	if err := fsys.Mkdir("/x/y"); err != nil {
		t.Fatal(err)
	}
	for round := 0; round < 3; round++ {
		for i := 0; i < 40; i++ {
			p := fmt.Sprintf("/x/y/r%d-%d", round, i)
			want[p] = randBytes(rng.IntN(70000))
			put(t, fsys, p, want[p])
		}
		for p := range want {
			if rng.IntN(3) == 0 {
				if err := fsys.Remove(p); err != nil {
					t.Fatal(err)
				}
				delete(want, p)
			}
		}
	}
	if err := fsys.Mkdir("/x/empty"); err != nil {
		t.Fatal(err)
	}
	if err := fsys.Remove("/x/empty"); err != nil {
		t.Fatal(err)
	}
	for p, b := range want {
		if got := get(t, fsys, p); !bytes.Equal(got, b) {
			t.Errorf("%s corrupted after removes", p)
		}
	}
	fsck(t, fsys, d)
}

// TestExt4FragmentedUnalignedRead is the regression test for go-diskfs
// #429: reading a fragmented file at an offset that is not block-aligned,
// just after an extent boundary, panicked or returned wrong data.
func TestExt4FragmentedUnalignedRead(t *testing.T) {
	fsys, d := newFS(t, disk.Ext4, 64<<20)
	// holes: small files, a filler that takes nearly all the rest, then
	// remove every other small file: the only free space is the holes
	for i := 0; i < 60; i++ {
		put(t, fsys, fmt.Sprintf("/h%d", i), randBytes(3*4096))
	}
	free, err := fsys.FreeSpace()
	if err != nil {
		t.Fatal(err)
	}
	blocks := free / 4096
	put(t, fsys, "/filler", make([]byte, (blocks-blocks/256-4)*4096))
	for i := 0; i < 60; i += 2 {
		if err := fsys.Remove(fmt.Sprintf("/h%d", i)); err != nil {
			t.Fatal(err)
		}
	}
	want := randBytes(85*4096 + 123)
	put(t, fsys, "/frag", want)
	r, err := fsys.Open("/frag")
	if err != nil {
		t.Fatal(err)
	}
	rng := mrand.New(mrand.NewPCG(4, 29))
	offsets := []int64{60*4096 + 1, 63*4096 + 4095, 66*4096 + 7, 4095, 1}
	for i := 0; i < 200; i++ {
		offsets = append(offsets, rng.Int64N(int64(len(want))))
	}
	for _, off := range offsets {
		n := 1 + rng.IntN(20000)
		buf := make([]byte, n)
		m, err := r.ReadAt(buf, off)
		if err != nil && err != io.EOF {
			t.Fatalf("read %d at %d: %v", n, off, err)
		}
		if !bytes.Equal(buf[:m], want[off:off+int64(m)]) || off+int64(m) != min(off+int64(n), int64(len(want))) {
			t.Fatalf("read %d at %d: wrong data", n, off)
		}
	}
	if got := get(t, fsys, "/frag"); !bytes.Equal(got, want) {
		t.Fatal("fragmented file read back wrong")
	}
	fsck(t, fsys, d)
	// removing files with extent-tree index blocks frees those too
	for _, p := range []string{"/frag", "/filler"} {
		if err := fsys.Remove(p); err != nil {
			t.Fatal(err)
		}
	}
	fsck(t, fsys, d)
}

func TestOpenFSErrors(t *testing.T) {
	for _, tc := range []struct {
		name string
		run  func(d *disk.Device) error
		want error
	}{
		{"blank-device", func(d *disk.Device) error { _, err := disk.OpenFS(d); return err }, disk.ErrUnknownFS},
		{"unknown-type", func(d *disk.Device) error { _, err := disk.Mkfs(d, "ntfs", ""); return err }, nil},
		{"fat32-too-small", func(d *disk.Device) error {
			small, err := disk.NewDevice(newImage(t, 32<<20), segOff, 32<<20, 512, nil)
			if err != nil {
				return err
			}
			_, err = disk.Mkfs(small, disk.FAT32, "")
			return err
		}, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newImage(t, 40<<20)
			_, c := newKey(t)
			err := tc.run(newDevice(t, f, 40<<20, 4096, c))
			if err == nil || (tc.want != nil && !errors.Is(err, tc.want)) {
				t.Fatalf("error %v, want %v", err, tc.want)
			}
		})
	}
}

// TestFSConcurrent runs file operations from several goroutines; run it
// with -race.
func TestFSConcurrent(t *testing.T) {
	for _, typ := range fsTypes {
		t.Run(string(typ), func(t *testing.T) {
			fsys, d := newFS(t, typ, 48<<20)
			done := make(chan error)
			for g := 0; g < 4; g++ {
				go func() {
					for i := 0; i < 8; i++ {
						p := fmt.Sprintf("/g%d-%d", g, i)
						b := randBytes(10000 * (i + 1))
						if err := fsys.Put(p, bytes.NewReader(b), -1); err != nil {
							done <- err
							return
						}
						var got bytes.Buffer
						if _, err := fsys.Get(p, &got); err != nil || !bytes.Equal(got.Bytes(), b) {
							done <- fmt.Errorf("%s read back wrong: %v", p, err)
							return
						}
						if i%2 == 0 {
							if err := fsys.Remove(p); err != nil {
								done <- err
								return
							}
						}
					}
					done <- nil
				}()
			}
			for g := 0; g < 4; g++ {
				if err := <-done; err != nil {
					t.Error(err)
				}
			}
			fsck(t, fsys, d)
		})
	}
}

// TestExt4MadeByMkfs opens filesystems that e2fsprogs made (metadata_csum,
// and 1 KiB blocks, where s_first_data_block is 1: the block-bitmap half
// of #425; and several groups, with mkfs.ext4's lazy-init flags, where a
// write spills into a BLOCK_UNINIT group holding a backup superblock),
// changes them, and has e2fsck check the result.
func TestExt4MadeByMkfs(t *testing.T) {
	mkfs := testutil.LookPath(t, "mkfs.ext4")
	for _, tc := range []struct {
		bs    string
		size  int64
		spill int // MiB, to fill group 0
	}{{"1024", 64 << 20, 0}, {"4096", 64 << 20, 0}, {"4096", 512 << 20, 150}} {
		t.Run(fmt.Sprintf("block-%s/%dM", tc.bs, tc.size>>20), func(t *testing.T) {
			size := tc.size
			f := newImage(t, size)
			out, err := exec.Command(mkfs, "-q", "-F", "-b", tc.bs, "-E", "offset="+fmt.Sprint(segOff), f.Name(), fmt.Sprintf("%dM", size>>20)).CombinedOutput()
			if err != nil {
				t.Fatalf("mkfs.ext4: %v\n%s", err, out)
			}
			d := newDevice(t, f, size, 4096, nil)
			fsys, err := disk.OpenFS(d)
			if err != nil {
				t.Fatal(err)
			}
			for _, n := range []string{"/a", "/b", "/c"} {
				put(t, fsys, n, bytes.Repeat([]byte(n), 5000))
			}
			if err := fsys.Mkdir("/d/e"); err != nil {
				t.Fatal(err)
			}
			put(t, fsys, "/d/e/f", randBytes(3<<20))
			for _, p := range []string{"/b", "/d/e/f", "/d/e"} {
				if err := fsys.Remove(p); err != nil {
					t.Fatal(err)
				}
			}
			g := randBytes(100000)
			put(t, fsys, "/g", g)
			if tc.spill > 0 {
				put(t, fsys, "/spill", randBytes(tc.spill<<20))
			}
			if got := get(t, fsys, "/c"); !bytes.Equal(got, bytes.Repeat([]byte("/c"), 5000)) {
				t.Error("/c corrupted")
			}
			if got := get(t, fsys, "/g"); !bytes.Equal(got, g) {
				t.Error("/g corrupted")
			}
			fsck(t, fsys, d)
		})
	}
}

// TestFSPutFailingReaderKeepsOldFile: an input that fails half way leaves
// the previous file as it was, and no temporary file.
func TestFSPutFailingReaderKeepsOldFile(t *testing.T) {
	for _, typ := range fsTypes {
		t.Run(string(typ), func(t *testing.T) {
			fsys, d := newFS(t, typ, 40<<20)
			old := randBytes(100000)
			put(t, fsys, "/f", old)
			r := io.MultiReader(bytes.NewReader(randBytes(6<<20)), iotestErrReader{})
			if err := fsys.Put("/f", r, -1); err == nil || !strings.Contains(err.Error(), "read input") {
				t.Fatalf("put from a failing reader: %v", err)
			}
			if got := get(t, fsys, "/f"); !bytes.Equal(got, old) {
				t.Fatal("the previous file did not survive")
			}
			if ls, _ := fsys.ReadDir("/"); len(ls) != 1 {
				t.Errorf("leftovers: %+v", ls)
			}
			fsck(t, fsys, d)
		})
	}
}

type iotestErrReader struct{}

func (iotestErrReader) Read([]byte) (int, error) { return 0, errors.New("network dropped") }
