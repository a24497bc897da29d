package ninep_test

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/hugelgupf/p9/p9"

	"github.com/keygate/keygate/disk"
)

// snapshot copies the image file as it is on disk now: what a crash at
// this instant would leave. It opens the copy as the next boot would.
func (v *volume) snapshot() *disk.FS {
	v.t.Helper()
	b, err := os.ReadFile(v.path)
	if err != nil {
		v.t.Fatal(err)
	}
	p := filepath.Join(v.t.TempDir(), "crash.img")
	if err := os.WriteFile(p, b, 0o600); err != nil {
		v.t.Fatal(err)
	}
	im, err := disk.OpenImage(p, v.key, false)
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

func getAll(t testing.TB, fsys *disk.FS, p string) []byte {
	t.Helper()
	var buf bytes.Buffer
	if _, err := fsys.Get(p, &buf); err != nil {
		t.Fatalf("get %s: %v", p, err)
	}
	return buf.Bytes()
}

func TestDurability(t *testing.T) {
	for _, typ := range fsTypes {
		t.Run(string(typ), func(t *testing.T) {
			v := newVolume(t, typ, 64<<20)
			root := v.client()
			old, data := randBytes(100_000), randBytes(200_000)
			writeFile(t, root, old, nil, "f")

			f := mustWalk(t, root, "f")
			if _, _, err := f.Open(p9.ReadWrite); err != nil {
				t.Fatal(err)
			}
			if _, err := f.WriteAt(data, 0); err != nil {
				t.Fatal(err)
			}
			// before fsync: a crash keeps the last flushed content whole
			if got := getAll(t, v.snapshot(), "/f"); !bytes.Equal(got, old) {
				t.Fatal("before fsync the crash image does not hold the previous content")
			}
			if err := f.FSync(); err != nil {
				t.Fatal(err)
			}
			if got := getAll(t, v.snapshot(), "/f"); !bytes.Equal(got, data) {
				t.Fatal("after fsync returned, the crash image lacks the write")
			}
			if _, err := f.WriteAt([]byte("tail"), 200_000); err != nil {
				t.Fatal(err)
			}
			if err := f.Close(); err != nil {
				t.Fatal(err)
			}
			want := append(slices.Clone(data), "tail"...)
			if got := getAll(t, v.snapshot(), "/f"); !bytes.Equal(got, want) {
				t.Fatal("after clunk returned, the crash image lacks the write")
			}
			// mkdir and create are durable when their reply arrives
			if _, err := root.Mkdir("d", 0o755, p9.NoUID, p9.NoGID); err != nil {
				t.Fatal(err)
			}
			g := create(t, root, "g", "d")
			if _, err := v.snapshot().Stat("/d/g"); err != nil {
				t.Fatalf("created file missing from the crash image: %v", err)
			}
			// a write left open is flushed by Close of the server
			if _, err := g.WriteAt([]byte("open at shutdown"), 0); err != nil {
				t.Fatal(err)
			}
			fsys := v.reopen()
			if got := getAll(t, fsys, "/d/g"); string(got) != "open at shutdown" {
				t.Fatalf("after server Close: %q", got)
			}
			if got := getAll(t, fsys, "/f"); !bytes.Equal(got, want) {
				t.Fatal("f differs after reopen")
			}
		})
	}
}

// TestCloseWithIdleClient checks Close does not wait for clients to
// leave (a hang here shows as the test binary's timeout).
func TestCloseWithIdleClient(t *testing.T) {
	v := newVolume(t, disk.Ext4, 40<<20)
	root := v.client()
	v.stop()
	if _, err := walk(root); err == nil {
		t.Fatal("the client still gets answers after Close")
	}
}

// TestCloseReportsUnstoredWrites checks that Close says when writes a
// client left open could not be stored, rather than dropping them quietly.
func TestCloseReportsUnstoredWrites(t *testing.T) {
	v := newVolume(t, disk.Ext4, 64<<20)
	if err := v.fsys.Put("/fill", bytes.NewReader(make([]byte, 20<<20)), 20<<20); err != nil {
		t.Fatal(err)
	}
	f := create(t, v.client(), "big")
	if _, err := f.WriteAt(make([]byte, 30<<20), 0); err != nil {
		t.Fatal(err)
	}
	err := v.srv.Close()
	if !errors.Is(err, disk.ErrNoSpace) || !strings.Contains(err.Error(), "/big") {
		t.Fatalf("Close: %v, want a no-space error naming /big", err)
	}
	v.stop()
}
