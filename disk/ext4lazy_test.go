package disk

import (
	"bytes"
	"crypto/rand"
	"encoding/binary"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/keygate/keygate/disk/xts"
	"github.com/keygate/keygate/internal/testutil"
)

// lazyDevice is an encrypted Device over a sparse temporary file.
func lazyDevice(t *testing.T, size int64) *Device {
	t.Helper()
	f, err := os.Create(filepath.Join(t.TempDir(), "vol.img"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	key := make([]byte, 64)
	rand.Read(key)
	c, err := xts.New(key)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	d, err := NewDevice(f, 0, size, 4096, c)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	return d
}

// TestPlanExt4 checks the layout arithmetic on sizes up to 16 TiB without
// writing anything: metadata inside the filesystem and inside its owner
// group, no block claimed twice in group 0, and the block bitmap mkfs
// writes matching the one the kernel computes wherever BLOCK_UNINIT is set
// (the free count it stores is the one the kernel will derive).
func TestPlanExt4(t *testing.T) {
	for _, size := range []int64{8 << 20, 64 << 20, 300 << 20, 1 << 30, 100 << 30, 1 << 40, 16 << 40} {
		p, err := planExt4(size)
		if err != nil {
			t.Fatalf("%d: %v", size, err)
		}
		if p.groups != int((p.blocks+mkfsBPG-1)/mkfsBPG) || p.blocks > uint64(size)/mkfsBlockSize {
			t.Errorf("%d: %d groups for %d blocks", size, p.groups, p.blocks)
		}
		for g := 0; g < p.groups; g++ {
			o := g &^ (mkfsFlex - 1)
			end := p.groupStart(o) + p.groupLen(o)
			if p.bb[g] < p.groupStart(o) || p.it[g]+p.itb > end {
				t.Fatalf("%d: group %d's metadata outside its owner group %d", size, g, o)
			}
			if !p.initBlocks[g] {
				// the kernel's view: base metadata only, for a group whose
				// own bitmaps and table live in its flex owner
				_, free := p.blockBitmap(g)
				if free != p.groupLen(g)-p.baseMeta(g) {
					t.Fatalf("%d: uninit group %d has %d free, kernel computes %d", size, g, free, p.groupLen(g)-p.baseMeta(g))
				}
			}
		}
		if p.journal+p.jblocks > p.blocks || p.root >= p.journal && p.root < p.journal+p.jblocks {
			t.Fatalf("%d: journal %d+%d, root %d", size, p.journal, p.jblocks, p.root)
		}
	}
	if _, err := planExt4(4 << 20); err == nil {
		t.Error("a 4 MiB ext4 was planned")
	}
}

// TestLazyExt4InitsOnTouch: touching an uninitialised group's inode
// bitmap or block bitmap through the wrapper initialises that group on
// disk; a stale GDT rewritten by go-diskfs cannot undo it; the result
// passes e2fsck on the full plaintext (garbage in all unwritten blocks).
func TestLazyExt4InitsOnTouch(t *testing.T) {
	e2fsck := testutil.LookPath(t, "e2fsck")
	const size = 1 << 30
	d := lazyDevice(t, size)
	if err := mkfsExt4(d, "T"); err != nil {
		t.Fatal(err)
	}
	m, err := readExt4Meta(d)
	if err != nil {
		t.Fatal(err)
	}
	p, _ := planExt4(size)
	for g := 0; g < m.groups; g++ {
		if m.flags(g)&bgBlockUninit == 0 {
			continue
		}
		want, _ := p.blockBitmap(g)
		if !bytes.Equal(m.computedBlockBitmap(g), want) {
			t.Fatalf("group %d: the bitmap the wrapper computes differs from mkfs's plan", g)
		}
	}
	staleGDT := append([]byte(nil), m.gdt...)
	l, ok := newLazyExt4(d, m).(*lazyExt4)
	if !ok {
		t.Fatal("no lazy wrapper on a fresh volume")
	}
	const ig, bg = 3, 5
	buf := make([]byte, 4096)
	if _, err := l.ReadAt(buf[:m.ipg/8], m.inodeBitmap(ig)); err != nil {
		t.Fatal(err)
	}
	if !allZero(buf[:m.ipg/8]) {
		t.Error("an initialised inode bitmap is not empty")
	}
	if _, err := l.ReadAt(buf, m.blockBitmap(bg)); err != nil {
		t.Fatal(err)
	}
	if want := m.computedBlockBitmap(bg); !bytes.Equal(buf, want) {
		t.Error("the initialised block bitmap is not the computed one")
	}
	// go-diskfs rewriting the GDT it read at open
	if _, err := l.WriteAt(staleGDT, m.gdtOff); err != nil {
		t.Fatal(err)
	}
	m2, err := readExt4Meta(d)
	if err != nil {
		t.Fatal(err)
	}
	if fl := m2.flags(ig); fl&bgInodeUninit != 0 || fl&bgInodeZeroed == 0 {
		t.Errorf("group %d flags %#x after init and a stale GDT write", ig, fl)
	}
	if fl := m2.flags(bg); fl&bgBlockUninit != 0 {
		t.Errorf("group %d flags %#x after init and a stale GDT write", bg, fl)
	}
	if fl := m2.flags(bg + 1); fl&bgBlockUninit == 0 {
		t.Errorf("group %d, never touched, was initialised", bg+1)
	}
	table := make([]byte, int64(m.ipg)*int64(m.inodeSize))
	if _, err := d.ReadAt(table, m.inodeTable(ig)); err != nil || !allZero(table) {
		t.Errorf("inode table %d not zeroed (%v)", ig, err)
	}
	if err := d.Flush(); err != nil {
		t.Fatal(err)
	}
	plain := make([]byte, size)
	if _, err := d.ReadAt(plain, 0); err != nil {
		t.Fatal(err)
	}
	img := filepath.Join(t.TempDir(), "plain.img")
	if err := os.WriteFile(img, plain, 0o600); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command(e2fsck, "-fn", img).CombinedOutput(); err != nil {
		t.Fatalf("e2fsck -fn: %v\n%s", err, out)
	}
	// the descriptor checksums e2fsck accepted are the ones we sealed
	le := binary.LittleEndian
	if le.Uint16(m2.desc(ig)[0x1e:]) == 0 {
		t.Error("no descriptor checksum")
	}
}
