package ninep_test

import (
	"bytes"
	"errors"
	"testing"

	"github.com/hugelgupf/p9/linux"
	"github.com/hugelgupf/p9/p9"
)

// TestFidsFollowTheTree: a fid names a file, not a path. After another
// connection renames the file's directory, a fid walked to it before
// (opened or not) reaches the file at its new name; a fid of a file a
// rename replaced, or that was removed, can no longer be opened or walked
// from, rather than reaching whatever takes the name next.
func TestFidsFollowTheTree(t *testing.T) {
	for _, typ := range fsTypes {
		t.Run(string(typ), func(t *testing.T) {
			v := newVolume(t, typ, 64<<20)
			a, b := v.client(), v.client()
			if _, err := a.Mkdir("d", 0o755, p9.NoUID, p9.NoGID); err != nil {
				t.Fatal(err)
			}
			writeFile(t, a, []byte("first"), []string{"d"}, "f")
			writeFile(t, a, []byte("victim"), nil, "v")
			writeFile(t, a, []byte("gone"), nil, "g")

			closed := mustWalk(t, a, "d", "f") // walked, not opened
			open := mustWalk(t, a, "d", "f")
			if _, _, err := open.Open(p9.ReadWrite); err != nil {
				t.Fatal(err)
			}
			dir := mustWalk(t, a, "d")
			victim := mustWalk(t, a, "v")
			gone := mustWalk(t, a, "g")

			// another connection renames d to e, f over v, and removes g
			if err := b.RenameAt("d", b, "e"); err != nil {
				t.Fatal(err)
			}
			e := mustWalk(t, b, "e")
			if err := e.RenameAt("f", b, "v"); err != nil {
				t.Fatal(err)
			}
			if err := b.UnlinkAt("g", 0); err != nil {
				t.Fatal(err)
			}
			writeFile(t, b, []byte("new g"), nil, "g")

			// the opened fid writes into the file at its new name
			if _, err := open.WriteAt([]byte("FIRST"), 0); err != nil {
				t.Fatal(err)
			}
			if err := open.FSync(); err != nil {
				t.Fatal(err)
			}
			if got := readFile(t, b, "v"); !bytes.Equal(got, []byte("FIRST")) {
				t.Fatalf("v after writing through the renamed fid: %q", got)
			}
			// the unopened one opens it there
			if _, _, err := closed.Open(p9.ReadOnly); err != nil {
				t.Fatalf("open of a fid whose file moved twice: %v", err)
			}
			buf := make([]byte, 16)
			if n, _ := closed.ReadAt(buf, 0); string(buf[:n]) != "FIRST" {
				t.Fatalf("read through it: %q", buf[:n])
			}
			// the directory's fid walks under its new name
			if _, err := walk(dir, "nothing"); !errors.Is(err, linux.ENOENT) {
				t.Fatalf("walk in the renamed directory: %v, want ENOENT", err)
			}
			// fids of the replaced and the removed file are dead, even
			// though their names exist again
			for name, f := range map[string]p9.File{"replaced": victim, "removed": gone} {
				if _, _, err := f.Open(p9.ReadOnly); !errors.Is(err, linux.EINVAL) {
					t.Fatalf("open of the %s file's fid: %v, want EINVAL", name, err)
				}
			}
			for _, f := range []p9.File{closed, open, dir, victim, gone, e} {
				if err := f.Close(); err != nil {
					t.Fatal(err)
				}
			}
		})
	}
}
