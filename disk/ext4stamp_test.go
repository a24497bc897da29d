package disk

import (
	"bytes"
	"os"
	"os/exec"
	"testing"

	"github.com/keygate/keygate/internal/testutil"
)

// TestPutRecordStamp leaves a Put's record naming a complete file, as a
// crash would before the rename, and opens the volume again: the repair
// removes the file (its name, blocks and inode), unless a kernel's mount
// came in between (its mount count in the superblock changed), when the
// record is dropped and the file kept. Either way e2fsck -fn finds
// nothing.
func TestPutRecordStamp(t *testing.T) {
	e2fsck := testutil.LookPath(t, "e2fsck")
	content := bytes.Repeat([]byte("stamped "), 4000)
	for _, tc := range []struct {
		name    string
		foreign bool
	}{{"repaired", false}, {"after a mount", true}} {
		t.Run(tc.name, func(t *testing.T) {
			img, err := os.CreateTemp(t.TempDir(), "img")
			if err != nil {
				t.Fatal(err)
			}
			defer img.Close()
			if err := img.Truncate(16 << 20); err != nil {
				t.Fatal(err)
			}
			dev, err := NewDevice(img, 0, 16<<20, 4096, nil)
			if err != nil {
				t.Fatal(err)
			}
			fsys, err := Mkfs(dev, Ext4, "STAMP")
			if err != nil {
				t.Fatal(err)
			}
			if err := fsys.Put("x", bytes.NewReader(content), int64(len(content))); err != nil {
				t.Fatal(err)
			}
			ino, err := fsys.inodeOf("x")
			if err != nil {
				t.Fatal(err)
			}
			m, err := readExt4Meta(dev)
			if err != nil {
				t.Fatal(err)
			}
			root, err := m.readDir(2)
			if err != nil {
				t.Fatal(err)
			}
			bi, rec, err := root.find("x")
			if err != nil {
				t.Fatal(err)
			}
			in, err := m.readInode(ino)
			if err != nil {
				t.Fatal(err)
			}
			leaves, _, err := m.extents(in)
			if err != nil {
				t.Fatal(err)
			}
			fsys.startPut(m, ino, 2, root.blocks[bi].phys, uint32(rec.off))
			fsys.plog.setRuns(mergeRuns(leaves))
			copy(m.sb[intentOff:0x3fc], fsys.plog.rec)
			fsys.stopPut()
			if tc.foreign {
				m.sb[0x34]++ // what a kernel's mount does
			}
			if err := m.writeSuper(); err != nil {
				t.Fatal(err)
			}
			if err := dev.Sync(); err != nil {
				t.Fatal(err)
			}
			fsys2, err := OpenFS(dev)
			if err != nil {
				t.Fatal(err)
			}
			_, err = fsys2.Stat("x")
			if kept := err == nil; kept != tc.foreign {
				t.Fatalf("/x kept: %v, want %v", kept, tc.foreign)
			}
			if out, err := exec.Command(e2fsck, "-fn", img.Name()).CombinedOutput(); err != nil {
				t.Fatalf("e2fsck -fn: %v\n%s", err, out)
			}
		})
	}
}
