package disk_test

import (
	"bytes"
	"fmt"
	"strings"
	"testing"

	"github.com/keygate/keygate/disk"
)

// TestPutFragmented stores a file that go-diskfs must place in more runs
// of free blocks than Put's record lists (ext4put.go): the record is
// dropped and the Put goes on as before, so the file must still be
// stored whole, with e2fsck -fn finding nothing and a reopen (which would
// act on a record left behind) keeping it.
func TestPutFragmented(t *testing.T) {
	const size = 16 << 20
	img := newImage(t, size)
	_, c := newKey(t)
	d := newDevice(t, img, size, 4096, c)
	fsys, err := disk.Mkfs(d, disk.Ext4, "FRAG")
	if err != nil {
		t.Fatal(err)
	}
	if err := fsys.Mkdir("h"); err != nil {
		t.Fatal(err)
	}
	const holes = 80
	for i := range 2 * holes {
		put(t, fsys, fmt.Sprintf("h/%03d", i), bytes.Repeat([]byte{byte(i)}, 4096))
	}
	for i := 0; i < 2*holes; i += 2 {
		if err := fsys.Remove(fmt.Sprintf("h/%03d", i)); err != nil {
			t.Fatal(err)
		}
	}
	free, err := fsys.FreeSpace()
	if err != nil {
		t.Fatal(err)
	}
	// all of the free space but some holes (and what Put counts for its
	// extent tree): the last allocation takes
	// what is left of the big free area, then one-block holes
	content := bytes.Repeat([]byte("fragmented "), int(free-16*4096-64<<10)/11)
	put(t, fsys, "x", content)
	img2 := plainCopy(t, fsys, d)
	out := run(t, "debugfs", "-R", "ex /x", img2)
	n := strings.Count(out, "\n") - 1
	if n <= 18 {
		t.Fatalf("/x has %d extents: the case did not need more runs than Put's record lists\n%s", n, out)
	}
	t.Logf("/x has %d extents", n)
	fsys2 := openFS(t, d)
	if !bytes.Equal(get(t, fsys2, "x"), content) {
		t.Fatal("/x differs after a reopen")
	}
	fsck(t, fsys2, d)
}
