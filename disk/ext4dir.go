package disk

// This file reads and patches ext4 directory blocks directly: the records
// of linear and htree (dir_index) directories, their metadata_csum tails,
// and what a rename needs beyond them: growing a directory by a block, and
// turning an htree directory back into a linear one (ext4rename.go).
// go-diskfs v1.9.4 has no ext4 rename, and rewrites a whole directory as
// linear blocks when it adds a name, without clearing an htree directory's
// index flag (which e2fsck then reports as a corrupt index).

import (
	"encoding/binary"
	"errors"
	"fmt"
	"slices"

	"github.com/diskfs/go-diskfs/filesystem/ext4/crc"
)

const (
	inodeFlagIndex = 0x1000 // EXT4_INDEX_FL: the directory has an htree index
	direntTail     = 12     // the metadata_csum tail record of a directory block
	// unindexMagic marks the intent record of an htree directory being
	// made linear: "KGU1".
	unindexMagic = 0x3155474b
)

// dirent is one record of a directory block.
type dirent struct {
	off, prev int // prev is the record before it in the block, or -1
	recLen    int
	ino       uint32
	name      string
}

// recSize is the room a record with a name of n bytes needs.
func recSize(n int) int { return (8 + n + 3) &^ 3 }

// isTail says whether b (12 bytes) is a metadata_csum dirent tail.
func isTail(b []byte) bool {
	le := binary.LittleEndian
	return le.Uint32(b) == 0 && le.Uint16(b[4:]) == direntTail && b[6] == 0 && b[7] == 0xde
}

// records walks a directory block's chain of records. It stops at the
// checksum tail or the block's end; an htree node's fake record (inode 0,
// spanning the block) is one record like any other.
func records(b []byte) ([]dirent, error) {
	le := binary.LittleEndian
	var out []dirent
	prev := -1
	for off := 0; off < len(b); {
		if off == len(b)-direntTail && isTail(b[off:]) {
			break
		}
		if off+8 > len(b) {
			return nil, fmt.Errorf("directory record at %d runs past the block", off)
		}
		rl, nl := int(le.Uint16(b[off+4:])), int(b[off+6])
		if rl < 8 || rl%4 != 0 || off+rl > len(b) || 8+nl > rl {
			return nil, fmt.Errorf("corrupt directory record at %d (length %d, name %d)", off, rl, nl)
		}
		out = append(out, dirent{off: off, prev: prev, recLen: rl, ino: le.Uint32(b[off:]), name: string(b[off+8 : off+8+nl])})
		prev = off
		off += rl
	}
	return out, nil
}

// dirSeed is the metadata_csum seed of inode ino's metadata blocks.
func (m *ext4Meta) inodeSeed(ino uint32, inode []byte) uint32 {
	var n [8]byte
	binary.LittleEndian.PutUint32(n[:], ino)
	copy(n[4:], inode[0x64:0x68])
	return crc.CRC32c(m.seed, n[:])
}

// dirBlock is one block of a directory.
type dirBlock struct {
	logical, phys uint64
	b             []byte
}

// dir is a directory's inode and blocks, read for patching.
type dir struct {
	m      *ext4Meta
	ino    uint32
	inode  []byte
	blocks []dirBlock
}

func (m *ext4Meta) readDir(ino uint32) (*dir, error) {
	in, err := m.readInode(ino)
	if err != nil {
		return nil, err
	}
	if binary.LittleEndian.Uint16(in[0:])&0xf000 != 0x4000 {
		return nil, fmt.Errorf("inode %d is not a directory", ino)
	}
	leaves, _, err := m.extents(in)
	if err != nil {
		return nil, fmt.Errorf("directory inode %d: %w", ino, err)
	}
	d := &dir{m: m, ino: ino, inode: in}
	size := uint64(binary.LittleEndian.Uint32(in[0x04:]))
	for _, e := range leaves {
		if e.unwritten {
			return nil, fmt.Errorf("directory inode %d has unwritten extents", ino)
		}
		for i := uint64(0); i < uint64(e.count); i++ {
			if (e.logical+i)*uint64(m.bs) >= size {
				break
			}
			b := make([]byte, m.bs)
			if _, err := m.dev.ReadAt(b, int64(e.phys+i)*m.bs); err != nil {
				return nil, fmt.Errorf("read directory block %d: %w", e.phys+i, err)
			}
			d.blocks = append(d.blocks, dirBlock{logical: e.logical + i, phys: e.phys + i, b: b})
		}
	}
	if len(d.blocks) == 0 {
		return nil, fmt.Errorf("directory inode %d has no blocks", ino)
	}
	return d, nil
}

func (d *dir) indexed() bool {
	return binary.LittleEndian.Uint32(d.inode[0x20:])&inodeFlagIndex != 0
}

// find returns the block index and record of name.
func (d *dir) find(name string) (int, dirent, error) {
	for i, blk := range d.blocks {
		rs, err := records(blk.b)
		if err != nil {
			return 0, dirent{}, fmt.Errorf("directory inode %d block %d: %w", d.ino, blk.logical, err)
		}
		for _, r := range rs {
			if r.ino != 0 && r.name == name {
				return i, r, nil
			}
		}
	}
	return 0, dirent{}, fmt.Errorf("no entry %q in directory inode %d", name, d.ino)
}

// seal sets the checksum tail of a directory block of inode ino, if the
// block has one (htree nodes carry theirs elsewhere, and are not changed).
func (m *ext4Meta) sealDirBlock(ino uint32, inode, b []byte) {
	if !m.metaCsum || !isTail(b[len(b)-direntTail:]) {
		return
	}
	n := len(b) - direntTail
	binary.LittleEndian.PutUint32(b[len(b)-4:], crc.CRC32c(m.inodeSeed(ino, inode), b[:n]))
}

func (d *dir) write(i int) error {
	blk := d.blocks[i]
	d.m.sealDirBlock(d.ino, d.inode, blk.b)
	if _, err := d.m.dev.WriteAt(blk.b, int64(blk.phys)*d.m.bs); err != nil {
		return fmt.Errorf("write directory block %d: %w", blk.phys, err)
	}
	return nil
}

// reseal recomputes the checksum tail of block phys of directory ino: a
// crash may have torn its last write between the record it changed and
// the tail, each of which alone leaves the block well formed.
func (m *ext4Meta) reseal(ino uint32, phys uint64) error {
	if !m.metaCsum || phys == 0 {
		return nil
	}
	in, err := m.readInode(ino)
	if err != nil {
		return err
	}
	b := make([]byte, m.bs)
	if _, err := m.dev.ReadAt(b, int64(phys)*m.bs); err != nil {
		return fmt.Errorf("read directory block %d: %w", phys, err)
	}
	m.sealDirBlock(ino, in, b)
	if _, err := m.dev.WriteAt(b, int64(phys)*m.bs); err != nil {
		return fmt.Errorf("write directory block %d: %w", phys, err)
	}
	return nil
}

// slot is where a new record of a name goes: at off in block i, either
// reusing an empty record there (reuse) or in the slack at the end of the
// record at split.
type slot struct {
	i, off int
	reuse  bool
	split  dirent
}

// room finds a slot for a record of need bytes in a linear directory.
func (d *dir) room(need int) (slot, bool, error) {
	for i, blk := range d.blocks {
		rs, err := records(blk.b)
		if err != nil {
			return slot{}, false, fmt.Errorf("directory inode %d block %d: %w", d.ino, blk.logical, err)
		}
		for _, r := range rs {
			if r.ino == 0 && r.recLen >= need {
				return slot{i: i, off: r.off, reuse: true}, true, nil
			}
			if used := recSize(len(r.name)); r.ino != 0 && r.recLen-used >= need {
				return slot{i: i, off: r.off + used, split: r}, true, nil
			}
		}
	}
	return slot{}, false, nil
}

// putRecord writes a record header and name at off of b.
func putRecord(b []byte, off int, ino uint32, recLen int, name string, typ byte) {
	le := binary.LittleEndian
	le.PutUint32(b[off:], ino)
	le.PutUint16(b[off+4:], uint16(recLen))
	b[off+6] = byte(len(name))
	b[off+7] = typ
	copy(b[off+8:], name)
}

// unlink takes record r out of block b: merged into the record before it,
// or, first in its block, marked empty. Either is one aligned write of at
// most 4 bytes, so it cannot tear.
func unlink(b []byte, r dirent) {
	le := binary.LittleEndian
	if r.prev >= 0 {
		le.PutUint16(b[r.prev+4:], le.Uint16(b[r.prev+4:])+uint16(r.recLen))
		return
	}
	le.PutUint32(b[r.off:], 0)
}

// emptyDirBlock is a directory block holding no name.
func (m *ext4Meta) emptyDirBlock(ino uint32, inode []byte) []byte {
	b := make([]byte, m.bs)
	n := len(b)
	if m.metaCsum {
		n -= direntTail
		putRecord(b, n, 0, direntTail, "", 0xde)
	}
	putRecord(b, 0, 0, n, "", 0)
	m.sealDirBlock(ino, inode, b)
	return b
}

// growDir adds an empty block to the end of directory ino, as a flush of
// ext4write.go would add a block to a file: the block written while free,
// then claimed, then the inode switched, under the same intent record.
func (f *FS) growDir(m *ext4Meta, ino uint32) error {
	in, err := m.readInode(ino)
	if err != nil {
		return err
	}
	le := binary.LittleEndian
	if le.Uint32(in[0x20:])&inodeFlagExtents == 0 || le.Uint16(in[0x28+6:]) > 1 {
		return fmt.Errorf("directory inode %d: its block map is beyond what keygate can grow (run e2fsck -D on the volume)", ino)
	}
	old, index, err := m.extents(in)
	if err != nil {
		return fmt.Errorf("directory inode %d: %w", ino, err)
	}
	size := int64(le.Uint32(in[0x04:]))
	nb := uint64(size / m.bs)
	p := &ext4Flush{m: m, ino: ino, inode: in, oldIndex: index, size: size + m.bs, sizeOld: size,
		bm: &bitmaps{m: m, maps: map[int][]byte{}, dirty: map[int]bool{}}}
	goal := m.firstData + uint64((ino-1)/m.ipg)*uint64(m.bpg)
	if g, ok := after(old, nb); ok {
		goal = g
	}
	e, err := p.bm.alloc(goal, 1)
	if errors.Is(err, errFallback) {
		return fmt.Errorf("directory inode %d needs a block: %w", ino, ErrNoSpace)
	} else if err != nil {
		return err
	}
	p.alloc = []extent{e}
	p.ext = mergeExtents(append(slices.Clone(old), extent{logical: nb, phys: e.phys, count: 1}))
	p.tree = true
	if err := p.buildTree(); err != nil {
		return fmt.Errorf("directory inode %d cannot grow: %w", ino, err)
	}
	if len(mergeRuns(append(slices.Clone(p.alloc), p.free...))) > intentMax {
		return fmt.Errorf("directory inode %d is too fragmented to grow (run e2fsck -D on the volume)", ino)
	}
	// the page holding the new block, with the directory's blocks before
	// it in that page as they are (run writes every mapped block of it)
	idx := int64(nb) * m.bs / pageSize
	pg := make([]byte, pageSize)
	first := uint64(idx * pageSize / m.bs)
	for b := first; b < nb; b++ {
		phys, ok := lookup(old, b)
		if !ok {
			continue
		}
		if _, err := m.dev.ReadAt(pg[int64(b-first)*m.bs:int64(b-first+1)*m.bs], int64(phys)*m.bs); err != nil {
			return fmt.Errorf("read directory block %d: %w", phys, err)
		}
	}
	copy(pg[int64(nb-first)*m.bs:], m.emptyDirBlock(ino, in))
	of := &openFile{pages: map[int64][]byte{idx: pg}}
	if err := p.run(of); err != nil {
		if rerr := f.recoverExt4(); rerr != nil {
			err = fmt.Errorf("%w (and repairing the bitmaps failed: %v)", err, rerr)
		}
		return fmt.Errorf("grow directory inode %d: %w", ino, err)
	}
	return m.dev.Sync() // the cleared intent, before the next record replaces it
}

// dxBlocks lists the logical numbers of an htree directory's index
// blocks: the root (block 0) and the interior nodes under it.
func (d *dir) dxBlocks() ([]uint64, error) {
	le := binary.LittleEndian
	root := d.blocks[0].b
	levels := int(root[0x1e])
	if root[0x1d] != 8 || levels > 2 {
		return nil, fmt.Errorf("directory inode %d: unknown htree root", d.ino)
	}
	out := []uint64{0}
	level := []struct {
		b   []byte
		off int
	}{{root, 0x20}}
	for l := 0; l < levels; l++ {
		var next []struct {
			b   []byte
			off int
		}
		for _, n := range level {
			count := int(le.Uint16(n.b[n.off+2:]))
			if n.off+8*count > len(n.b) {
				return nil, fmt.Errorf("directory inode %d: corrupt htree node", d.ino)
			}
			for k := 0; k < count; k++ {
				lb := uint64(le.Uint32(n.b[n.off+8*k+4:]))
				blk := d.block(lb)
				if blk == nil {
					return nil, fmt.Errorf("directory inode %d: htree points past its end", d.ino)
				}
				out = append(out, lb)
				next = append(next, struct {
					b   []byte
					off int
				}{blk.b, 8})
			}
		}
		level = next
	}
	return out, nil
}

func (d *dir) block(logical uint64) *dirBlock {
	for i := range d.blocks {
		if d.blocks[i].logical == logical {
			return &d.blocks[i]
		}
	}
	return nil
}

// unindex turns an htree directory into a linear one, as the kernel reads
// one whose index it cannot use: the index flag cleared, the root made a
// block holding "." and "..", every interior node an empty block. The
// name blocks (the leaves) are valid linear blocks already. A directory
// keygate adds a name to must be linear: go-diskfs writes linear blocks,
// and this rename adds a name wherever there is room, not where the
// index would look for it. The intent record lets the next writable open
// finish a conversion a crash cut short.
func (f *FS) unindex(m *ext4Meta, d *dir) error {
	lbs, err := d.dxBlocks()
	if err != nil {
		return err
	}
	var phys []uint64
	for _, lb := range lbs {
		phys = append(phys, d.block(lb).phys)
	}
	if len(phys) > (0x3fc-intentOff-12)/8 {
		return fmt.Errorf("directory inode %d: its htree has too many index blocks to convert (run e2fsck -D on the volume)", d.ino)
	}
	le := binary.LittleEndian
	b := m.sb[intentOff:0x3fc]
	clear(b)
	le.PutUint32(b, unindexMagic)
	le.PutUint32(b[4:], d.ino)
	le.PutUint32(b[8:], uint32(len(phys)))
	for i, p := range phys {
		le.PutUint64(b[12+8*i:], p)
	}
	if err := m.writeSuper(); err != nil {
		return err
	}
	if err := m.dev.Sync(); err != nil {
		return err
	}
	le.PutUint32(d.inode[0x20:], le.Uint32(d.inode[0x20:])&^inodeFlagIndex)
	if err := m.writeInode(d.ino, d.inode); err != nil {
		return err
	}
	if err := m.dev.Sync(); err != nil {
		return err
	}
	if err := m.finishUnindex(); err != nil {
		return err
	}
	if err := m.dev.Sync(); err != nil {
		return err
	}
	clear(b)
	if err := m.writeSuper(); err != nil {
		return err
	}
	return m.dev.Sync()
}

// finishUnindex rewrites the index blocks its intent record lists as
// linear blocks, once the inode no longer has the index flag (before
// that, nothing was changed). It may run any number of times.
func (m *ext4Meta) finishUnindex() error {
	le := binary.LittleEndian
	b := m.sb[intentOff:0x3fc]
	ino, n := le.Uint32(b[4:]), int(le.Uint32(b[8:]))
	if n < 1 || n > (0x3fc-intentOff-12)/8 {
		return nil
	}
	in, err := m.readInode(ino)
	if err != nil {
		return err
	}
	if le.Uint32(in[0x20:])&inodeFlagIndex != 0 {
		return nil
	}
	for i := 0; i < n; i++ {
		phys := le.Uint64(b[12+8*i:])
		if phys < m.firstData || phys >= m.blocksCount {
			return fmt.Errorf("unindex intent names block %d, outside the filesystem", phys)
		}
		blk := m.emptyDirBlock(ino, in)
		if i == 0 {
			// the root: "." and "..", whose inode it keeps
			old := make([]byte, 16)
			if _, err := m.dev.ReadAt(old, int64(phys)*m.bs); err != nil {
				return fmt.Errorf("read directory block %d: %w", phys, err)
			}
			end := len(blk)
			if m.metaCsum {
				end -= direntTail
			}
			putRecord(blk, 0, ino, 12, ".", 2)
			putRecord(blk, 12, le.Uint32(old[12:]), end-12, "..", 2)
			m.sealDirBlock(ino, in, blk)
		}
		if _, err := m.dev.WriteAt(blk, int64(phys)*m.bs); err != nil {
			return fmt.Errorf("write directory block %d: %w", phys, err)
		}
	}
	return nil
}

// unindexParent makes the directory that will hold p linear before
// go-diskfs adds p to it (see unindex).
func (f *FS) unindexParent(p string) error {
	if f.typ != Ext4 {
		return nil
	}
	ino, err := f.dirInode(parentOf(p))
	if err != nil {
		return err
	}
	m, err := readExt4Meta(f.dev)
	if err != nil {
		return err
	}
	d, err := m.readDir(ino)
	if err != nil {
		return err
	}
	if !d.indexed() {
		return nil
	}
	if err := f.unindex(m, d); err != nil {
		return fmt.Errorf("make directory %s linear: %w", display(parentOf(p)), err)
	}
	return f.reload()
}

func parentOf(p string) string {
	for i := len(p) - 1; i >= 0; i-- {
		if p[i] == '/' {
			return p[:i]
		}
	}
	return "."
}

// dirInode is the inode of directory p ("." is the root, inode 2).
func (f *FS) dirInode(p string) (uint32, error) {
	if p == "." {
		return 2, nil
	}
	return f.inodeOf(p)
}
