package ninep_test

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/hugelgupf/p9/linux"
	"github.com/hugelgupf/p9/p9"

	"github.com/keygate/keygate/disk"
	"github.com/keygate/keygate/disk/ninep"
)

var fsTypes = []disk.FSType{disk.Ext4, disk.FAT32}

// volume is a real encrypted image, unlocked, with a 9P server on a unix
// socket in front of its filesystem.
type volume struct {
	t      testing.TB
	path   string
	key    *disk.Key
	im     *disk.Image
	fsys   *disk.FS
	srv    *ninep.Server
	sock   string
	served chan error
}

// testLog sends the server's log to the test's.
type testLog struct{ t testing.TB }

func (l testLog) Write(p []byte) (int, error) {
	l.t.Log(strings.TrimSpace(string(p)))
	return len(p), nil
}

func newKey(t testing.TB) *disk.Key {
	b := make([]byte, 32)
	rand.Read(b)
	k, err := disk.NewKey(b)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(k.Destroy)
	return k
}

// newVolume creates an image of size bytes holding filesystem typ and
// serves it.
func newVolume(t testing.TB, typ disk.FSType, size int64, opts ...ninep.Option) *volume {
	t.Helper()
	v := &volume{t: t, path: filepath.Join(t.TempDir(), "vol.img"), key: newKey(t)}
	if _, err := disk.CreateImage(v.path, v.key, disk.CreateOptions{Size: size, FS: typ, PBKDF: disk.PBKDF2}); err != nil {
		t.Fatal(err)
	}
	v.start(opts...)
	t.Cleanup(v.stop)
	return v
}

func (v *volume) start(opts ...ninep.Option) {
	v.t.Helper()
	im, err := disk.OpenImage(v.path, v.key, true)
	if err != nil {
		v.t.Fatal(err)
	}
	fsys, err := im.FS()
	if err != nil {
		v.t.Fatal(err)
	}
	// unix socket paths are limited to 108 bytes: TempDir can be longer
	dir, err := os.MkdirTemp("", "9p")
	if err != nil {
		v.t.Fatal(err)
	}
	v.t.Cleanup(func() { os.RemoveAll(dir) })
	v.sock = filepath.Join(dir, "s")
	l, err := net.Listen("unix", v.sock)
	if err != nil {
		v.t.Fatal(err)
	}
	opts = append([]ninep.Option{ninep.WithLogger(slog.New(slog.NewTextHandler(testLog{v.t}, nil)))}, opts...)
	v.im, v.fsys, v.srv, v.served = im, fsys, ninep.NewServer(fsys, opts...), make(chan error, 1)
	go func() { v.served <- v.srv.Serve(l) }()
}

// stop closes the server and the image; it may be called twice.
func (v *volume) stop() {
	if v.srv == nil {
		return
	}
	if err := v.srv.Close(); err != nil {
		v.t.Errorf("close server: %v", err)
	}
	if err := <-v.served; err != nil {
		v.t.Errorf("serve returned %v after Close, want nil", err)
	}
	if err := v.im.Close(); err != nil {
		v.t.Errorf("close image: %v", err)
	}
	v.srv = nil
}

// reopen closes everything and unlocks the image again, as the next boot would.
func (v *volume) reopen() *disk.FS {
	v.t.Helper()
	v.stop()
	im, err := disk.OpenImage(v.path, v.key, false)
	if err != nil {
		v.t.Fatal(err)
	}
	v.t.Cleanup(func() { im.Close() })
	fsys, err := im.FS()
	if err != nil {
		v.t.Fatal(err)
	}
	return fsys
}

// client connects a new 9P client and attaches to the root.
func (v *volume) client() p9.File {
	v.t.Helper()
	conn, err := net.Dial("unix", v.sock)
	if err != nil {
		v.t.Fatal(err)
	}
	c, err := p9.NewClient(conn)
	if err != nil {
		conn.Close()
		v.t.Fatal(err)
	}
	v.t.Cleanup(func() { c.Close() })
	root, err := c.Attach("/")
	if err != nil {
		v.t.Fatal(err)
	}
	return root
}

func walk(root p9.File, names ...string) (p9.File, error) {
	_, f, err := root.Walk(names)
	return f, err
}

func mustWalk(t testing.TB, root p9.File, names ...string) p9.File {
	t.Helper()
	f, err := walk(root, names...)
	if err != nil {
		t.Fatalf("walk %v: %v", names, err)
	}
	return f
}

// create makes dir/name and returns it open for writing.
func create(t testing.TB, root p9.File, name string, dir ...string) p9.File {
	t.Helper()
	d := mustWalk(t, root, dir...) // Create turns the fid into the new file
	f, _, _, err := d.Create(name, p9.ReadWrite, 0o644, p9.NoUID, p9.NoGID)
	if err != nil {
		d.Close()
		t.Fatalf("create %v/%s: %v", dir, name, err)
	}
	return f
}

func writeFile(t testing.TB, root p9.File, data []byte, dir []string, name string) {
	t.Helper()
	f := create(t, root, name, dir...)
	if n, err := f.WriteAt(data, 0); err != nil || n != len(data) {
		t.Fatalf("write %s: %d, %v", name, n, err)
	}
	if err := f.Close(); err != nil {
		t.Fatalf("clunk %s: %v", name, err)
	}
}

func readFile(t testing.TB, root p9.File, names ...string) []byte {
	t.Helper()
	f := mustWalk(t, root, names...)
	defer f.Close()
	if _, _, err := f.Open(p9.ReadOnly); err != nil {
		t.Fatalf("open %v: %v", names, err)
	}
	var out bytes.Buffer
	buf := make([]byte, 1<<20)
	for off := int64(0); ; {
		n, err := f.ReadAt(buf, off)
		out.Write(buf[:n])
		off += int64(n)
		if err == io.EOF || (err == nil && n == 0) {
			return out.Bytes()
		}
		if err != nil {
			t.Fatalf("read %v at %d: %v", names, off, err)
		}
	}
}

func size(t testing.TB, root p9.File, names ...string) uint64 {
	t.Helper()
	f := mustWalk(t, root, names...)
	defer f.Close()
	_, _, a, err := f.GetAttr(p9.AttrMaskAll)
	if err != nil {
		t.Fatal(err)
	}
	return a.Size
}

func list(t testing.TB, root p9.File, names ...string) []string {
	t.Helper()
	d := mustWalk(t, root, names...)
	defer d.Close()
	if _, _, err := d.Open(p9.ReadOnly); err != nil {
		t.Fatal(err)
	}
	var out []string
	for off := uint64(0); ; {
		ents, err := d.Readdir(off, 4096)
		if err != nil {
			t.Fatal(err)
		}
		if len(ents) == 0 {
			break
		}
		for _, e := range ents {
			out = append(out, e.Name)
			off = e.Offset
		}
	}
	slices.Sort(out)
	return out
}

func randBytes(n int) []byte {
	b := make([]byte, n)
	rand.Read(b)
	return b
}

func TestOperations(t *testing.T) {
	for _, typ := range fsTypes {
		t.Run(string(typ), func(t *testing.T) {
			v := newVolume(t, typ, 96<<20)
			root := v.client()
			a, b := randBytes(300_000), randBytes(5000)

			if _, err := root.Mkdir("docs", 0o755, p9.NoUID, p9.NoGID); err != nil {
				t.Fatal(err)
			}
			if _, err := root.Mkdir("other", 0o755, p9.NoUID, p9.NoGID); err != nil {
				t.Fatal(err)
			}
			writeFile(t, root, a, []string{"docs"}, "a.bin")
			writeFile(t, root, b, nil, "b.txt")

			if got := readFile(t, root, "docs", "a.bin"); !bytes.Equal(got, a) {
				t.Fatalf("read docs/a.bin: %d bytes, not what was written", len(got))
			}
			if got := size(t, root, "docs", "a.bin"); got != uint64(len(a)) {
				t.Fatalf("getattr size %d, want %d", got, len(a))
			}
			qids, _, err := root.Walk([]string{"docs"})
			if err != nil || len(qids) != 1 || qids[0].Type != p9.TypeDir {
				t.Fatalf("walk docs: %v %v", qids, err)
			}
			if got := list(t, root); !slices.Equal(got, []string{"b.txt", "docs", "other"}) {
				t.Fatalf("readdir / = %v", got)
			}

			// partial overwrite, then extend past the end with a gap
			f := mustWalk(t, root, "b.txt")
			if _, _, err := f.Open(p9.ReadWrite); err != nil {
				t.Fatal(err)
			}
			if _, err := f.WriteAt([]byte("XYZ"), 10); err != nil {
				t.Fatal(err)
			}
			if _, err := f.WriteAt([]byte("end"), 70_000); err != nil {
				t.Fatal(err)
			}
			want := append(slices.Clone(b), make([]byte, 70_003-len(b))...)
			copy(want[10:], "XYZ")
			copy(want[70_000:], "end")
			// a second client sees the unflushed writes, as with a page cache
			if got := readFile(t, v.client(), "b.txt"); !bytes.Equal(got, want) {
				t.Fatal("second client does not see the open file's writes")
			}
			if err := f.Close(); err != nil {
				t.Fatal(err)
			}
			if got := readFile(t, root, "b.txt"); !bytes.Equal(got, want) {
				t.Fatal("b.txt after partial writes differs")
			}

			// a file removed while open keeps its content and its size
			u := create(t, root, "unlinked")
			if _, err := u.WriteAt([]byte("still here"), 0); err != nil {
				t.Fatal(err)
			}
			if err := root.UnlinkAt("unlinked", 0); err != nil {
				t.Fatal(err)
			}
			if _, _, a, err := u.GetAttr(p9.AttrMaskAll); err != nil || a.Size != 10 {
				t.Fatalf("getattr of an open, removed file: %+v, %v", a, err)
			}
			got := make([]byte, 10)
			if n, err := u.ReadAt(got, 0); n != 10 || string(got) != "still here" {
				t.Fatalf("read of an open, removed file: %q, %v", got[:n], err)
			}
			if err := u.Close(); err != nil {
				t.Fatal(err)
			}
			if _, err := walk(root, "unlinked"); !errors.Is(err, linux.ENOENT) {
				t.Fatalf("the removed file came back at clunk: %v", err)
			}

			// truncate through setattr, shorter then longer
			g := mustWalk(t, root, "b.txt")
			if err := g.SetAttr(p9.SetAttrMask{Size: true}, p9.SetAttr{Size: 5}); err != nil {
				t.Fatal(err)
			}
			if err := g.SetAttr(p9.SetAttrMask{Size: true}, p9.SetAttr{Size: 8}); err != nil {
				t.Fatal(err)
			}
			g.Close()
			if got, want := readFile(t, root, "b.txt"), append(slices.Clone(b[:5]), 0, 0, 0); !bytes.Equal(got, want) {
				t.Fatalf("after truncate 5 then 8: %x, want %x", got, want)
			}
			// mode and times are accepted and kept fixed
			if err := g2(t, root, "b.txt").SetAttr(p9.SetAttrMask{Permissions: true, MTime: true}, p9.SetAttr{Permissions: 0o600}); err != nil {
				t.Fatal(err)
			}

			// rename: same directory, across directories, over an existing file
			dir := mustWalk(t, root, "docs")
			if err := dir.RenameAt("a.bin", dir, "a2.bin"); err != nil {
				t.Fatal(err)
			}
			other := mustWalk(t, root, "other")
			if err := dir.RenameAt("a2.bin", other, "moved.bin"); err != nil {
				t.Fatal(err)
			}
			if err := root.RenameAt("b.txt", other, "moved.bin"); err != nil {
				t.Fatal(err)
			}
			if got := list(t, root, "other"); !slices.Equal(got, []string{"moved.bin"}) {
				t.Fatalf("other/ = %v", got)
			}
			if got := list(t, root, "docs"); len(got) != 0 {
				t.Fatalf("docs/ = %v, want empty", got)
			}
			if got := readFile(t, root, "other", "moved.bin"); len(got) != 8 {
				t.Fatalf("other/moved.bin has %d bytes, want b.txt's 8", len(got))
			}
			// an empty directory moves anywhere
			if err := root.RenameAt("docs", other, "docs2"); err != nil {
				t.Fatal(err)
			}

			// remove a file, then the directories
			if err := other.UnlinkAt("moved.bin", 0); err != nil {
				t.Fatal(err)
			}
			if err := other.UnlinkAt("docs2", 0x200); err != nil {
				t.Fatal(err)
			}
			if err := root.UnlinkAt("other", 0x200); err != nil {
				t.Fatal(err)
			}
			if got := list(t, root); len(got) != 0 {
				t.Fatalf("/ = %v, want empty", got)
			}
			st, err := root.StatFS()
			if err != nil || st.BlocksFree == 0 || st.BlocksFree > st.Blocks {
				t.Fatalf("statfs: %+v, %v", st, err)
			}
			fsck(t, v)
			fsys := v.reopen()
			if l, err := fsys.ReadDir("/"); err != nil || len(l) != 0 {
				t.Fatalf("after reopen / = %v, %v", l, err)
			}
		})
	}
}

func g2(t testing.TB, root p9.File, names ...string) p9.File {
	f := mustWalk(t, root, names...)
	t.Cleanup(func() { f.Close() })
	return f
}

func TestErrno(t *testing.T) {
	for _, typ := range fsTypes {
		t.Run(string(typ), func(t *testing.T) {
			v := newVolume(t, typ, 64<<20)
			root := v.client()
			if _, err := root.Mkdir("d", 0o755, p9.NoUID, p9.NoGID); err != nil {
				t.Fatal(err)
			}
			if _, err := root.Mkdir("e", 0o755, p9.NoUID, p9.NoGID); err != nil {
				t.Fatal(err)
			}
			writeFile(t, root, []byte("x"), []string{"d"}, "f")
			writeFile(t, root, []byte("y"), nil, "g")

			ro := newVolume(t, typ, 56<<20, ninep.ReadOnly())
			roRoot := ro.client()
			if _, err := roRoot.Mkdir("ok", 0o755, p9.NoUID, p9.NoGID); !errors.Is(err, linux.EROFS) {
				t.Fatalf("mkdir on a read-only server: %v, want EROFS", err)
			}

			for _, tc := range []struct {
				name string
				op   func() error
				want linux.Errno
			}{
				{"walk missing", func() error { _, err := walk(root, "nope"); return err }, linux.ENOENT},
				{"walk missing in dir", func() error { _, err := walk(root, "d", "nope"); return err }, linux.ENOENT},
				{"create existing", func() error {
					d := mustWalk(t, root, "d")
					_, _, _, err := d.Create("f", p9.ReadWrite, 0o644, p9.NoUID, p9.NoGID)
					d.Close()
					return err
				}, linux.EEXIST},
				{"mkdir existing", func() error { _, err := root.Mkdir("d", 0o755, p9.NoUID, p9.NoGID); return err }, linux.EEXIST},
				{"mkdir over file", func() error { _, err := root.Mkdir("g", 0o755, p9.NoUID, p9.NoGID); return err }, linux.EEXIST},
				{"rmdir a file", func() error { return root.UnlinkAt("g", 0x200) }, linux.ENOTDIR},
				{"rename dir over file", func() error { return root.RenameAt("e", root, "g") }, linux.ENOTDIR},
				{"rename file over dir", func() error { return root.RenameAt("g", root, "e") }, linux.EISDIR},
				{"open dir for writing", func() error {
					d := mustWalk(t, root, "d")
					defer d.Close()
					_, _, err := d.Open(p9.WriteOnly)
					return err
				}, linux.EISDIR},
				{"rmdir non-empty", func() error { return root.UnlinkAt("d", 0x200) }, linux.ENOTEMPTY},
				{"rename over non-empty dir", func() error { return root.RenameAt("e", root, "d") }, linux.ENOTEMPTY},
				{"unlink missing", func() error { return root.UnlinkAt("nope", 0) }, linux.ENOENT},
				{"rename missing", func() error { return root.RenameAt("nope", root, "x") }, linux.ENOENT},
				{"rename dir into itself", func() error {
					d := mustWalk(t, root, "d")
					defer d.Close()
					return root.RenameAt("d", d, "inner")
				}, linux.EINVAL},
				{"move non-empty dir", func() error {
					e := mustWalk(t, root, "e")
					defer e.Close()
					if err := root.RenameAt("d", e, "d"); err != nil || typ == disk.FAT32 {
						return err
					}
					return e.RenameAt("d", root, "d") // and back, for the checks below
				}, map[disk.FSType]linux.Errno{disk.FAT32: linux.EXDEV}[typ]}, // ext4 moves it
				{"write to read-only fid", func() error {
					f := mustWalk(t, root, "g")
					defer f.Close()
					if _, _, err := f.Open(p9.ReadOnly); err != nil {
						return err
					}
					_, err := f.WriteAt([]byte("z"), 0)
					return err
				}, linux.EPERM}, // p9's own check, before the fid's file sees it
				{"write past the volume", func() error {
					f := mustWalk(t, root, "g")
					defer f.Close()
					if _, _, err := f.Open(p9.ReadWrite); err != nil {
						return err
					}
					_, err := f.WriteAt([]byte("z"), 1<<40)
					return err
				}, linux.EFBIG},
				{"open on read-only server", func() error {
					f := mustWalk(t, roRoot)
					defer f.Close()
					_, _, _, err := f.Create("x", p9.ReadWrite, 0o644, p9.NoUID, p9.NoGID)
					return err
				}, linux.EROFS},
				{"fill the volume", func() error {
					// each file fits alone, the pair does not: the flush at
					// clunk is where the space runs out
					for i := range 3 {
						f := create(t, root, fmt.Sprintf("big%d", i))
						if _, err := f.WriteAt(make([]byte, 20<<20), 0); err != nil {
							f.Close()
							return err
						}
						if err := f.Close(); err != nil {
							return err
						}
					}
					return nil
				}, linux.ENOSPC},
			} {
				t.Run(tc.name, func(t *testing.T) {
					err := tc.op()
					if tc.want == 0 && err != nil || tc.want != 0 && !errors.Is(err, tc.want) {
						t.Fatalf("got %v, want %v", err, tc.want)
					}
				})
			}
			// the server answered every failure; the volume is still whole
			if got := readFile(t, root, "d", "f"); string(got) != "x" {
				t.Fatalf("d/f = %q after the errors", got)
			}
			fsck(t, v)
		})
	}
}

func TestConcurrentClients(t *testing.T) {
	for _, typ := range fsTypes {
		t.Run(string(typ), func(t *testing.T) {
			v := newVolume(t, typ, 96<<20)
			const n = 4
			shared := randBytes(1 << 20)
			writeFile(t, v.client(), shared, nil, "shared")
			roots := make([]p9.File, n)
			for i := range roots {
				roots[i] = v.client()
			}
			datas := make([][]byte, n)
			var wg sync.WaitGroup
			errs := make(chan error, 2*n)
			for i := range n {
				datas[i] = randBytes(512<<10 + i*4097)
				wg.Add(2)
				go func() {
					defer wg.Done()
					f, _, _, err := mustWalk(t, roots[i]).Create(fmt.Sprintf("c%d", i), p9.ReadWrite, 0o644, p9.NoUID, p9.NoGID)
					if err != nil {
						errs <- err
						return
					}
					for off := 0; off < len(datas[i]); off += 8192 {
						if _, err := f.WriteAt(datas[i][off:min(off+8192, len(datas[i]))], int64(off)); err != nil {
							errs <- err
							return
						}
					}
					errs <- f.Close()
				}()
				go func() {
					defer wg.Done()
					f, err := walk(roots[i], "shared")
					if err != nil {
						errs <- err
						return
					}
					defer f.Close()
					if _, _, err := f.Open(p9.ReadOnly); err != nil {
						errs <- err
						return
					}
					got := make([]byte, len(shared))
					if _, err := f.ReadAt(got, 0); err != nil && err != io.EOF {
						errs <- err
						return
					}
					if !bytes.Equal(got, shared) {
						errs <- fmt.Errorf("client %d read a different shared file", i)
					}
				}()
			}
			wg.Wait()
			close(errs)
			for err := range errs {
				if err != nil {
					t.Fatal(err)
				}
			}
			for i := range n {
				if got := readFile(t, roots[(i+1)%n], fmt.Sprintf("c%d", i)); !bytes.Equal(got, datas[i]) {
					t.Fatalf("c%d differs when read by another client", i)
				}
			}
			fsck(t, v)
		})
	}
}

func TestLargeFile(t *testing.T) {
	const size = 32 << 20
	for _, typ := range fsTypes {
		t.Run(string(typ), func(t *testing.T) {
			v := newVolume(t, typ, 128<<20)
			data := randBytes(size)
			want := sha256.Sum256(data)
			f := create(t, v.client(), "large")
			const chunk = 1 << 20
			for off := 0; off < size; off += chunk {
				if _, err := f.WriteAt(data[off:off+chunk], int64(off)); err != nil {
					t.Fatal(err)
				}
			}
			if err := f.FSync(); err != nil {
				t.Fatal(err)
			}
			if err := f.Close(); err != nil {
				t.Fatal(err)
			}
			h := sha256.New()
			h.Write(readFile(t, v.client(), "large"))
			if got := h.Sum(nil); !bytes.Equal(got, want[:]) {
				t.Fatal("32 MiB file read over 9P has a different SHA-256")
			}
			fsys := v.reopen()
			h.Reset()
			if n, err := fsys.Get("/large", h); err != nil || n != size {
				t.Fatalf("get after reopen: %d, %v", n, err)
			}
			if got := h.Sum(nil); !bytes.Equal(got, want[:]) {
				t.Fatal("32 MiB file after reopen has a different SHA-256")
			}
		})
	}
}

// TestReaddirPages lists a directory too big for one Rreaddir.
func TestReaddirPages(t *testing.T) {
	for _, typ := range fsTypes {
		t.Run(string(typ), func(t *testing.T) {
			v := newVolume(t, typ, 56<<20)
			var want []string
			for i := range 100 {
				n := fmt.Sprintf("entry-with-a-name-long-enough-to-fill-pages-%03d", i)
				if err := v.fsys.Put("/"+n, strings.NewReader(n), int64(len(n))); err != nil {
					t.Fatal(err)
				}
				want = append(want, n)
			}
			if got := list(t, v.client()); !slices.Equal(got, want) {
				t.Fatalf("readdir returned %d names, want %d: %v", len(got), len(want), got)
			}
		})
	}
}
