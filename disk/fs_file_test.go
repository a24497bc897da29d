package disk_test

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	iofs "io/fs"
	mrand "math/rand/v2"
	"os"
	"testing"

	"github.com/keygate/keygate/disk"
)

func readAll(t testing.TB, h *disk.File) []byte {
	t.Helper()
	b := make([]byte, h.Size()+10)
	n, err := h.ReadAt(b, 0)
	if err != io.EOF {
		t.Fatalf("read to the end: %d, %v (want io.EOF)", n, err)
	}
	return b[:n]
}

// TestOpenFileMatchesModel drives random writes, truncations, reads and
// syncs through two handles on one file and compares with a byte slice.
func TestOpenFileMatchesModel(t *testing.T) {
	for _, typ := range fsTypes {
		for seed := range uint64(3) {
			t.Run(fmt.Sprintf("%s/seed-%d", typ, seed), func(t *testing.T) {
				fsys, d := newFS(t, typ, 64<<20)
				rng := mrand.New(mrand.NewPCG(seed, 7))
				initial := randBytes(rng.IntN(300_000))
				if seed == 0 {
					initial = nil // a new file: ext4 stores it in place
				}
				put(t, fsys, "/f", initial)
				model := bytes.Clone(initial)
				h1, err := fsys.OpenFile("/f", os.O_RDWR)
				if err != nil {
					t.Fatal(err)
				}
				h2, err := fsys.OpenFile("/f", os.O_RDWR)
				if err != nil {
					t.Fatal(err)
				}
				for i := range 150 {
					h := h1
					if i%2 == 1 {
						h = h2
					}
					switch op := rng.IntN(10); {
					case op < 5:
						off := rng.IntN(len(model) + 200_000)
						b := randBytes(1 + rng.IntN(150_000))
						if _, err := h.WriteAt(b, int64(off)); err != nil {
							t.Fatal(err)
						}
						if end := off + len(b); end > len(model) {
							model = append(model, make([]byte, end-len(model))...)
						}
						copy(model[off:], b)
					case op < 7:
						n := rng.IntN(len(model) + 100_000)
						if err := h.Truncate(int64(n)); err != nil {
							t.Fatal(err)
						}
						if n < len(model) {
							model = model[:n]
						} else {
							model = append(model, make([]byte, n-len(model))...)
						}
					case op < 9:
						off := rng.IntN(len(model) + 1)
						b := make([]byte, rng.IntN(200_000))
						n, err := h.ReadAt(b, int64(off))
						want := model[off:min(len(model), off+len(b))]
						if (err != nil && err != io.EOF) || !bytes.Equal(b[:n], want) {
							t.Fatalf("op %d: read %d at %d: %d bytes, %v; differs from the model", i, len(b), off, n, err)
						}
					default:
						if err := h.Sync(); err != nil {
							t.Fatal(err)
						}
						if got := get(t, fsys, "/f"); !bytes.Equal(got, model) {
							t.Fatalf("op %d: after Sync the stored file differs from the model", i)
						}
					}
					if fi, err := fsys.Stat("/f"); err != nil || fi.Size != int64(len(model)) {
						t.Fatalf("op %d: stat size %d, %v; want %d", i, fi.Size, err, len(model))
					}
				}
				if err := h1.Close(); err != nil {
					t.Fatal(err)
				}
				if err := h2.Close(); err != nil {
					t.Fatal(err)
				}
				if got := get(t, fsys, "/f"); !bytes.Equal(got, model) {
					t.Fatal("after Close the stored file differs from the model")
				}
				fsck(t, fsys, d)
			})
		}
	}
}

func TestOpenFileErrors(t *testing.T) {
	for _, typ := range fsTypes {
		t.Run(string(typ), func(t *testing.T) {
			fsys, _ := newFS(t, typ, 40<<20)
			put(t, fsys, "/file", []byte("content"))
			if err := fsys.Mkdir("/dir"); err != nil {
				t.Fatal(err)
			}
			for _, tc := range []struct {
				name string
				p    string
				flag int
				want error
			}{
				{"missing", "/nope", os.O_RDONLY, iofs.ErrNotExist},
				{"exclusive over existing", "/file", os.O_RDWR | os.O_CREATE | os.O_EXCL, iofs.ErrExist},
				{"a directory", "/dir", os.O_RDONLY, disk.ErrIsDir},
				{"the root", "/", os.O_RDONLY, disk.ErrIsDir},
				{"create in a missing directory", "/nodir/x", os.O_RDWR | os.O_CREATE, iofs.ErrNotExist},
				{"create below a file", "/file/x", os.O_RDWR | os.O_CREATE, disk.ErrNotDir},
			} {
				t.Run(tc.name, func(t *testing.T) {
					h, err := fsys.OpenFile(tc.p, tc.flag)
					if err == nil {
						h.Close()
					}
					if !errors.Is(err, tc.want) {
						t.Fatalf("got %v, want %v", err, tc.want)
					}
				})
			}
			h, err := fsys.OpenFile("/file", os.O_RDONLY)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := h.WriteAt([]byte("x"), 0); !errors.Is(err, iofs.ErrPermission) {
				t.Fatalf("write through a read-only handle: %v", err)
			}
			if _, err := h.WriteAt([]byte("x"), -1); err == nil {
				t.Fatal("a negative offset was accepted")
			}
			h.Close()
			if _, err := h.ReadAt(make([]byte, 1), 0); !errors.Is(err, iofs.ErrClosed) {
				t.Fatalf("read after Close: %v", err)
			}
			h, err = fsys.OpenFile("/file", os.O_RDWR)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := h.WriteAt([]byte("x"), fsys.Size()); !errors.Is(err, disk.ErrTooLarge) {
				t.Fatalf("write past the volume: %v", err)
			}
			h.Close()
			h, err = fsys.OpenFile("/file", os.O_RDWR|os.O_TRUNC)
			if err != nil {
				t.Fatal(err)
			}
			if err := h.Close(); err != nil {
				t.Fatal(err)
			}
			if got := get(t, fsys, "/file"); len(got) != 0 {
				t.Fatalf("O_TRUNC left %q", got)
			}
		})
	}
}

func TestOpenFileReadOnlyVolume(t *testing.T) {
	f := newImage(t, 40<<20)
	_, c := newKey(t)
	d := newDevice(t, f, 40<<20, 4096, c)
	fsys, err := disk.Mkfs(d, disk.Ext4, "RO")
	if err != nil {
		t.Fatal(err)
	}
	put(t, fsys, "/f", []byte("data"))
	if err := fsys.Close(); err != nil {
		t.Fatal(err)
	}
	ro, err := disk.OpenFS(newDevice(t, f, 40<<20, 4096, c, disk.ReadOnly()))
	if err != nil {
		t.Fatal(err)
	}
	for _, flag := range []int{os.O_RDWR, os.O_WRONLY, os.O_RDONLY | os.O_CREATE, os.O_RDONLY | os.O_TRUNC} {
		if _, err := ro.OpenFile("/f", flag); !errors.Is(err, disk.ErrReadOnly) {
			t.Errorf("open flag %#x: %v, want ErrReadOnly", flag, err)
		}
	}
	if err := ro.Rename("/f", "/g"); !errors.Is(err, disk.ErrReadOnly) {
		t.Errorf("rename: %v, want ErrReadOnly", err)
	}
	h, err := ro.OpenFile("/f", os.O_RDONLY)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	if got := readAll(t, h); string(got) != "data" {
		t.Fatalf("read %q", got)
	}
}

// TestOpenFileUnlinked checks that Remove or Put under an open file keeps
// the handle's content, as an unlinked file on Unix, and that its writes
// do not bring the name back.
func TestOpenFileUnlinked(t *testing.T) {
	for _, typ := range fsTypes {
		for _, replace := range []bool{false, true} {
			t.Run(fmt.Sprintf("%s/replace-%v", typ, replace), func(t *testing.T) {
				fsys, d := newFS(t, typ, 48<<20)
				old := randBytes(200_000)
				put(t, fsys, "/f", old)
				h, err := fsys.OpenFile("/f", os.O_RDWR)
				if err != nil {
					t.Fatal(err)
				}
				if _, err := h.WriteAt([]byte("mine"), 0); err != nil {
					t.Fatal(err)
				}
				if replace {
					put(t, fsys, "/f", []byte("new content"))
				} else if err := fsys.Remove("/f"); err != nil {
					t.Fatal(err)
				}
				// the freed blocks may be reused; the handle must not see that
				put(t, fsys, "/other", randBytes(300_000))
				want := append([]byte("mine"), old[4:]...)
				if got := readAll(t, h); !bytes.Equal(got, want) {
					t.Fatal("the open handle lost its content")
				}
				if err := h.Close(); err != nil {
					t.Fatal(err)
				}
				fi, err := fsys.Stat("/f")
				switch {
				case replace && (err != nil || fi.Size != int64(len("new content"))):
					t.Fatalf("the replacement was overwritten by the old handle: %+v %v", fi, err)
				case !replace && !errors.Is(err, iofs.ErrNotExist):
					t.Fatalf("closing the unlinked handle recreated /f: %v", err)
				}
				fsck(t, fsys, d)
			})
		}
	}
}

func TestPutOverEmptyFile(t *testing.T) {
	for _, typ := range fsTypes {
		t.Run(string(typ), func(t *testing.T) {
			fsys, d := newFS(t, typ, 40<<20)
			put(t, fsys, "/e", nil)
			put(t, fsys, "/e", []byte("now with data"))
			if got := get(t, fsys, "/e"); string(got) != "now with data" {
				t.Fatalf("got %q", got)
			}
			put(t, fsys, "/e2", nil)
			if err := fsys.Remove("/e2"); err != nil {
				t.Fatal(err)
			}
			fsck(t, fsys, d)
		})
	}
}

func TestRename(t *testing.T) {
	type result struct {
		err   error
		moved bool // otherwise nothing changed
	}
	for _, typ := range fsTypes {
		for _, tc := range []struct {
			name     string
			from, to string
			want     result
			wantExt4 *result // where ext4 differs
		}{
			{name: "file in its directory", from: "/a/f", to: "/a/g", want: result{moved: true}},
			{name: "file across directories", from: "/a/f", to: "/b/f", want: result{moved: true}},
			{name: "file over a file", from: "/a/f", to: "/b/x", want: result{moved: true}},
			{name: "file over a directory", from: "/a/f", to: "/b/empty", want: result{err: disk.ErrIsDir}},
			{name: "directory over a file", from: "/b/empty", to: "/a/f", want: result{err: disk.ErrNotDir}},
			{name: "empty directory across", from: "/b/empty", to: "/a/empty2", want: result{moved: true}},
			{name: "empty directory over an empty one", from: "/b/empty", to: "/c", want: result{moved: true}},
			{name: "directory over a non-empty one", from: "/b/empty", to: "/a", want: result{err: disk.ErrNotEmpty}},
			{name: "full directory in its parent", from: "/a", to: "/z", want: result{moved: true}},
			{name: "full directory across", from: "/a", to: "/b/a",
				want: result{err: disk.ErrCannotMove}, wantExt4: &result{moved: true}},
			{name: "directory into itself", from: "/b", to: "/b/empty/b", want: result{err: disk.ErrInvalid}},
			{name: "missing", from: "/a/nope", to: "/a/g", want: result{err: iofs.ErrNotExist}},
			{name: "into a missing directory", from: "/a/f", to: "/nodir/f", want: result{err: iofs.ErrNotExist}},
			{name: "the root", from: "/", to: "/r", want: result{err: disk.ErrInvalid}},
			{name: "onto itself", from: "/a/f", to: "/a/f", want: result{moved: false}},
		} {
			t.Run(string(typ)+"/"+tc.name, func(t *testing.T) {
				want := tc.want
				if typ == disk.Ext4 && tc.wantExt4 != nil {
					want = *tc.wantExt4
				}
				fsys, d := newFS(t, typ, 40<<20)
				for _, dir := range []string{"/a", "/b/empty", "/c"} {
					if err := fsys.Mkdir(dir); err != nil {
						t.Fatal(err)
					}
				}
				data := randBytes(100_000)
				put(t, fsys, "/a/f", data)
				put(t, fsys, "/b/x", []byte("old x"))
				before, err := fsys.Stat(tc.from)
				if err != nil && want.err == nil {
					t.Fatal(err)
				}
				err = fsys.Rename(tc.from, tc.to)
				if !errors.Is(err, want.err) || (want.err == nil) != (err == nil) {
					t.Fatalf("got %v, want %v", err, want.err)
				}
				if want.moved {
					if _, err := fsys.Stat(tc.from); !errors.Is(err, iofs.ErrNotExist) {
						t.Fatalf("%s still there: %v", tc.from, err)
					}
					after, err := fsys.Stat(tc.to)
					if err != nil || after.IsDir != before.IsDir || after.Size != before.Size {
						t.Fatalf("%s: %+v, %v; want %+v", tc.to, after, err, before)
					}
					if !after.IsDir {
						if got := get(t, fsys, tc.to); !bytes.Equal(got, data) {
							t.Fatal("moved file content differs")
						}
					}
				} else if got := get(t, fsys, "/a/f"); !bytes.Equal(got, data) {
					t.Fatal("/a/f changed by a failed rename")
				}
				fsck(t, fsys, d)
			})
		}
		for _, dst := range []string{"/g", "/b/g"} {
			t.Run(string(typ)+"/open file follows to "+dst, func(t *testing.T) {
				fsys, d := newFS(t, typ, 40<<20)
				if err := fsys.Mkdir("/b"); err != nil {
					t.Fatal(err)
				}
				put(t, fsys, "/f", []byte("0123456789"))
				h, err := fsys.OpenFile("/f", os.O_RDWR)
				if err != nil {
					t.Fatal(err)
				}
				if _, err := h.WriteAt([]byte("ab"), 0); err != nil {
					t.Fatal(err)
				}
				if err := fsys.Rename("/f", dst); err != nil {
					t.Fatal(err)
				}
				if _, err := h.WriteAt([]byte("YZ"), 8); err != nil {
					t.Fatal(err)
				}
				if err := h.Close(); err != nil {
					t.Fatal(err)
				}
				if got := get(t, fsys, dst); string(got) != "ab234567YZ" {
					t.Fatalf("%s = %q", dst, got)
				}
				if _, err := fsys.Stat("/f"); !errors.Is(err, iofs.ErrNotExist) {
					t.Fatalf("/f came back: %v", err)
				}
				fsck(t, fsys, d)
			})
		}
	}
}

// TestCloseStoresOpenFiles checks FS.Close stores writes still open.
func TestCloseStoresOpenFiles(t *testing.T) {
	for _, typ := range fsTypes {
		t.Run(string(typ), func(t *testing.T) {
			fsys, d := newFS(t, typ, 40<<20)
			h, err := fsys.OpenFile("/f", os.O_RDWR|os.O_CREATE)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := h.WriteAt([]byte("unflushed"), 0); err != nil {
				t.Fatal(err)
			}
			if err := fsys.Close(); err != nil {
				t.Fatal(err)
			}
			again, err := disk.OpenFS(d)
			if err != nil {
				t.Fatal(err)
			}
			if got := get(t, again, "/f"); string(got) != "unflushed" {
				t.Fatalf("after Close /f = %q", got)
			}
			fsck(t, again, d)
		})
	}
}
