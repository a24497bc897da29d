package disk

// This file reads and patches ext4 metadata directly on the Device. It
// exists for these go-diskfs v1.9.4 bugs:
//
//   - #425: ext4 Remove clears the wrong inode bitmap bit (inode+1, so a
//     live inode is later handed out again and two files share it), frees
//     blocks at the wrong bitmap index (it ignores s_first_data_block, and
//     the first block of a group lands out of range), counts freed blocks
//     twice in the free counters, leaves the inode record live, never frees
//     extent-tree index blocks, and keeps the parent's link count after an
//     rmdir. removeExt4 empties the inode's extent tree before calling
//     go-diskfs, so it frees no blocks and counts none; then frees the
//     blocks itself, repairs the inode bitmap, wipes the inode, fixes the
//     parent's links, recomputes the free counters and checksums from the
//     bitmaps, and reloads go-diskfs so it drops its stale in-memory
//     superblock and group descriptors.
//   - go-diskfs leaves the checksums of extent tree blocks unset under
//     metadata_csum (which mkfsExt4 and mkfs.ext4 turn on); FS.write seals
//     them (sealExtentBlocks) once a file is written.
//   - #429: ext4 File.Read/Write panic (negative makeslice) or misread when
//     the offset is not block-aligned and the previous extent ends in the
//     block before it. FS reads file data itself from the extent tree
//     (extentReader), and writes only at block-aligned offsets.

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"math/bits"
	"path"
	"slices"

	"github.com/diskfs/go-diskfs/filesystem/ext4"
	"github.com/diskfs/go-diskfs/filesystem/ext4/crc"
)

const (
	incompatRecover    = 0x4 // the journal needs replay
	incompat64Bit      = 0x80
	incompatCsumSeed   = 0x2000
	roCompatGdtCsum    = 0x10
	roCompatMetaCsum   = 0x400
	bgInodeUninit      = 0x1
	bgBlockUninit      = 0x2
	inodeFlagExtents   = 0x80000
	extentMagic        = 0xf30a
	maxInitExtentCount = 32768
)

// ext4Meta is what we need of the superblock and the group descriptors.
type ext4Meta struct {
	dev            *Device
	sb             []byte
	bs             int64
	firstData      uint64
	blocksCount    uint64
	bpg, ipg       uint32
	inodeSize      int
	descSize       int
	groups         int
	gdtOff         int64
	gdt            []byte
	seed           uint32
	metaCsum, gdtC bool
}

func readExt4Meta(dev *Device) (*ext4Meta, error) {
	sb := make([]byte, 1024)
	if _, err := dev.ReadAt(sb, 1024); err != nil {
		return nil, fmt.Errorf("read ext4 superblock: %w", err)
	}
	le := binary.LittleEndian
	if le.Uint16(sb[0x38:]) != 0xef53 {
		return nil, errors.New("read ext4 superblock: bad magic")
	}
	m := &ext4Meta{dev: dev, sb: sb,
		bs:        1024 << le.Uint32(sb[0x18:]),
		firstData: uint64(le.Uint32(sb[0x14:])),
		bpg:       le.Uint32(sb[0x20:]),
		ipg:       le.Uint32(sb[0x28:]),
		inodeSize: int(le.Uint16(sb[0x58:])),
		descSize:  32,
	}
	incompat, ro := le.Uint32(sb[0x60:]), le.Uint32(sb[0x64:])
	m.blocksCount = uint64(le.Uint32(sb[0x04:]))
	if incompat&incompat64Bit != 0 {
		m.descSize = int(le.Uint16(sb[0xfe:]))
		m.blocksCount |= uint64(le.Uint32(sb[0x150:])) << 32
	}
	// Bounds before any size is computed from them: this runs before
	// go-diskfs has checked anything (repairTornSuper, reload).
	if le.Uint32(sb[0x18:]) > 6 || m.bpg == 0 || m.ipg == 0 || m.descSize < 32 || m.descSize > 1024 ||
		m.firstData >= m.blocksCount || m.blocksCount > uint64(dev.Size())/uint64(m.bs)+1 {
		return nil, errors.New("read ext4 superblock: corrupt geometry")
	}
	m.metaCsum, m.gdtC = ro&roCompatMetaCsum != 0, ro&roCompatGdtCsum != 0
	if incompat&incompatCsumSeed != 0 {
		m.seed = le.Uint32(sb[0x270:])
	} else {
		m.seed = crc.CRC32c(0xffffffff, sb[0x68:0x78])
	}
	m.groups = int((m.blocksCount - m.firstData + uint64(m.bpg) - 1) / uint64(m.bpg))
	m.gdtOff = int64(m.firstData+1) * m.bs
	m.gdt = make([]byte, m.groups*m.descSize)
	if _, err := dev.ReadAt(m.gdt, m.gdtOff); err != nil {
		return nil, fmt.Errorf("read ext4 group descriptors: %w", err)
	}
	return m, nil
}

func (m *ext4Meta) desc(g int) []byte { return m.gdt[g*m.descSize : (g+1)*m.descSize] }

// field reads a lo/hi split group descriptor field.
func (m *ext4Meta) field(g, lo, hi, width int) uint64 {
	d, le := m.desc(g), binary.LittleEndian
	var v, h uint64
	if width == 4 {
		v = uint64(le.Uint32(d[lo:]))
		if m.descSize >= 64 {
			h = uint64(le.Uint32(d[hi:]))
		}
		return v | h<<32
	}
	v = uint64(le.Uint16(d[lo:]))
	if m.descSize >= 64 {
		h = uint64(le.Uint16(d[hi:]))
	}
	return v | h<<16
}

func (m *ext4Meta) setField16(g, lo, hi int, v uint32) {
	d, le := m.desc(g), binary.LittleEndian
	le.PutUint16(d[lo:], uint16(v))
	if m.descSize >= 64 {
		le.PutUint16(d[hi:], uint16(v>>16))
	}
}

func (m *ext4Meta) blockBitmap(g int) int64 { return int64(m.field(g, 0x00, 0x20, 4)) * m.bs }
func (m *ext4Meta) inodeBitmap(g int) int64 { return int64(m.field(g, 0x04, 0x24, 4)) * m.bs }
func (m *ext4Meta) inodeTable(g int) int64  { return int64(m.field(g, 0x08, 0x28, 4)) * m.bs }
func (m *ext4Meta) flags(g int) uint16      { return binary.LittleEndian.Uint16(m.desc(g)[0x12:]) }

func (m *ext4Meta) inodeOff(ino uint32) int64 {
	g := int((ino - 1) / m.ipg)
	return m.inodeTable(g) + int64((ino-1)%m.ipg)*int64(m.inodeSize)
}

func (m *ext4Meta) readInode(ino uint32) ([]byte, error) {
	b := make([]byte, m.inodeSize)
	if _, err := m.dev.ReadAt(b, m.inodeOff(ino)); err != nil {
		return nil, fmt.Errorf("read inode %d: %w", ino, err)
	}
	return b, nil
}

// writeInode writes b with a fresh checksum. go-diskfs verifies inode
// checksums even without metadata_csum, so they are always written; an
// all-zero (freed) inode is written as is, as e2fsck expects.
func (m *ext4Meta) writeInode(ino uint32, b []byte) error {
	if !allZero(b) {
		sealInode(m.seed, ino, b)
	}
	if _, err := m.dev.WriteAt(b, m.inodeOff(ino)); err != nil {
		return fmt.Errorf("write inode %d: %w", ino, err)
	}
	return nil
}

func allZero(b []byte) bool {
	for _, x := range b {
		if x != 0 {
			return false
		}
	}
	return true
}

// extent is a run of a file's blocks: count blocks from file block
// logical at filesystem block phys. Unwritten runs read as zeros.
type extent struct {
	logical, phys uint64
	count         uint32
	unwritten     bool
}

// extents walks the extent tree rooted in the inode's i_block and returns
// its leaf extents in file order, and the tree's index blocks.
func (m *ext4Meta) extents(inode []byte) ([]extent, []uint64, error) {
	if binary.LittleEndian.Uint32(inode[0x20:])&inodeFlagExtents == 0 {
		return nil, nil, errors.New("inode does not use extents (not supported)")
	}
	var leaves []extent
	var index []uint64
	var walk func(node []byte, depth int) error
	walk = func(node []byte, depth int) error {
		le := binary.LittleEndian
		if le.Uint16(node) != extentMagic {
			return errors.New("corrupt extent tree: bad magic")
		}
		n, d := int(le.Uint16(node[2:])), int(le.Uint16(node[6:]))
		if d != depth || 12+12*n > len(node) {
			return errors.New("corrupt extent tree: bad header")
		}
		for i := 0; i < n; i++ {
			e := node[12+12*i:]
			if d == 0 {
				cnt, unw := uint32(le.Uint16(e[4:])), false
				if cnt > maxInitExtentCount {
					cnt, unw = cnt-maxInitExtentCount, true
				}
				leaves = append(leaves, extent{logical: uint64(le.Uint32(e)), count: cnt, unwritten: unw,
					phys: uint64(le.Uint16(e[6:]))<<32 | uint64(le.Uint32(e[8:]))})
				continue
			}
			blk := uint64(le.Uint16(e[8:]))<<32 | uint64(le.Uint32(e[4:]))
			if blk >= m.blocksCount {
				return errors.New("corrupt extent tree: index beyond the filesystem")
			}
			index = append(index, blk)
			child := make([]byte, m.bs)
			if _, err := m.dev.ReadAt(child, int64(blk)*m.bs); err != nil {
				return fmt.Errorf("read extent block %d: %w", blk, err)
			}
			if err := walk(child, d-1); err != nil {
				return err
			}
		}
		return nil
	}
	root := inode[0x28 : 0x28+60]
	return leaves, index, walk(root, int(binary.LittleEndian.Uint16(root[6:])))
}

// removeExt4 removes p on ext4 around go-diskfs's broken Remove (#425).
func (f *FS) removeExt4(p string, isDir bool) error {
	m := f.ext
	ino, err := f.inodeOf(p)
	if err != nil {
		return err
	}
	parent := uint32(2)
	if d := path.Dir(p); d != "." {
		if parent, err = f.inodeOf(d); err != nil {
			return err
		}
	}
	in, err := m.readInode(ino)
	if err != nil {
		return err
	}
	leaves, index, err := m.extents(in)
	if err != nil {
		return fmt.Errorf("inode %d: %w", ino, err)
	}
	// go-diskfs clears the bit of inode ino+1; remember it to restore it
	g, bit := int((ino-1)/m.ipg), int((ino-1)%m.ipg)
	ib := make([]byte, m.ipg/8)
	if _, err := m.dev.ReadAt(ib, m.inodeBitmap(g)); err != nil {
		return fmt.Errorf("read inode bitmap %d: %w", g, err)
	}
	nextUsed := bit+1 < int(m.ipg) && ib[(bit+1)/8]&(1<<((bit+1)%8)) != 0
	// empty the extent tree, so go-diskfs frees and counts no blocks
	le := binary.LittleEndian
	le.PutUint16(in[0x28+2:], 0)
	le.PutUint16(in[0x28+6:], 0)
	le.PutUint32(in[0x04:], 0)
	le.PutUint32(in[0x6c:], 0)
	le.PutUint32(in[0x1c:], 0)
	le.PutUint16(in[0x74:], 0)
	if err := m.writeInode(ino, in); err != nil {
		return err
	}
	rmErr := f.fs.Remove(p)
	if rmErr != nil {
		if _, err := f.stat(p); err == nil {
			return rmErr // still there: nothing else was changed
		}
	}
	// go-diskfs rewrote the GDT from memory: read what it wrote
	if m, err = readExt4Meta(f.dev); err != nil {
		return err
	}
	if rmErr != nil && isDir {
		// it failed (on the last inode of a group, clearing a bit past the
		// bitmap) after unlinking but before counting the directory gone
		if n := m.field(g, 0x10, 0x30, 2); n > 0 {
			m.setField16(g, 0x10, 0x30, uint32(n-1))
		}
	}
	if _, err := m.dev.ReadAt(ib, m.inodeBitmap(g)); err != nil {
		return fmt.Errorf("read inode bitmap %d: %w", g, err)
	}
	ib[bit/8] &^= 1 << (bit % 8)
	if bit+1 < int(m.ipg) && nextUsed {
		ib[(bit+1)/8] |= 1 << ((bit + 1) % 8)
	}
	if _, err := m.dev.WriteAt(ib, m.inodeBitmap(g)); err != nil {
		return fmt.Errorf("write inode bitmap %d: %w", g, err)
	}
	var blocks []extent
	blocks = append(blocks, leaves...)
	for _, b := range index {
		blocks = append(blocks, extent{phys: b, count: 1})
	}
	if err := m.freeBlocks(blocks); err != nil {
		return err
	}
	clear(in)
	if err := m.writeInode(ino, in); err != nil {
		return err
	}
	if isDir {
		pin, err := m.readInode(parent)
		if err != nil {
			return err
		}
		if n := le.Uint16(pin[0x1a:]); n > 2 {
			le.PutUint16(pin[0x1a:], n-1)
		}
		if err := m.writeInode(parent, pin); err != nil {
			return err
		}
	}
	if err := m.recount(); err != nil {
		return err
	}
	if err := f.reload(); err != nil {
		return fmt.Errorf("reload filesystem: %w", err)
	}
	return nil
}

// sealExtentBlocks sets the metadata_csum checksums of file p's extent
// tree blocks, which go-diskfs v1.9.4 leaves unset (e2fsck: "extent block
// passes checks, but checksum does not match extent"). The root lives in
// the inode, whose checksum go-diskfs does set.
func (f *FS) sealExtentBlocks(p string) error {
	m, le := f.ext, binary.LittleEndian
	ino, err := f.inodeOf(p)
	if err != nil {
		return err
	}
	in, err := m.readInode(ino)
	if err != nil {
		return err
	}
	_, index, err := m.extents(in)
	if err != nil {
		return fmt.Errorf("inode %d: %w", ino, err)
	}
	var n [8]byte
	le.PutUint32(n[:], ino)
	le.PutUint32(n[4:], le.Uint32(in[0x64:]))
	seed := crc.CRC32c(m.seed, n[:])
	blk := make([]byte, m.bs)
	for _, b := range index {
		if _, err := m.dev.ReadAt(blk, int64(b)*m.bs); err != nil {
			return fmt.Errorf("read extent block %d: %w", b, err)
		}
		tail := 12 + 12*int(le.Uint16(blk[4:]))
		if tail+4 > len(blk) {
			return fmt.Errorf("extent block %d: corrupt header", b)
		}
		le.PutUint32(blk[tail:], crc.CRC32c(seed, blk[:tail]))
		if _, err := m.dev.WriteAt(blk, int64(b)*m.bs); err != nil {
			return fmt.Errorf("write extent block %d: %w", b, err)
		}
	}
	return nil
}

func (f *FS) inodeOf(p string) (uint32, error) {
	fi, err := f.fs.Stat(p)
	if err != nil {
		return 0, err
	}
	st, ok := fi.Sys().(*ext4.StatT)
	if !ok || st.Ino == 0 {
		return 0, fmt.Errorf("no inode number for %s", display(p))
	}
	return st.Ino, nil
}

// freeBlocks clears the blocks of es in the block bitmaps.
func (m *ext4Meta) freeBlocks(es []extent) error {
	maps := map[int][]byte{}
	for _, e := range es {
		for b := e.phys; b < e.phys+uint64(e.count); b++ {
			if b < m.firstData || b >= m.blocksCount {
				return fmt.Errorf("block %d is outside the filesystem", b)
			}
			g, i := int((b-m.firstData)/uint64(m.bpg)), (b-m.firstData)%uint64(m.bpg)
			bm, ok := maps[g]
			if !ok {
				bm = make([]byte, m.bs)
				if _, err := m.dev.ReadAt(bm, m.blockBitmap(g)); err != nil {
					return fmt.Errorf("read block bitmap %d: %w", g, err)
				}
				maps[g] = bm
			}
			bm[i/8] &^= 1 << (i % 8)
		}
	}
	for g, bm := range maps {
		if _, err := m.dev.WriteAt(bm, m.blockBitmap(g)); err != nil {
			return fmt.Errorf("write block bitmap %d: %w", g, err)
		}
	}
	return nil
}

// recount derives every group's free counts and bitmap checksums from its
// bitmaps, and the superblock's totals from the groups, then writes them.
func (m *ext4Meta) recount() error {
	if err := m.count(); err != nil {
		return err
	}
	return m.writeCounts()
}

// recountIfStale writes what recount derives only where it differs from
// what is on disk, and reports whether it did.
func (m *ext4Meta) recountIfStale() (bool, error) {
	gdt, sb := slices.Clone(m.gdt), slices.Clone(m.sb)
	if err := m.count(); err != nil {
		return false, err
	}
	if bytes.Equal(gdt, m.gdt) && bytes.Equal(sb, m.sb) {
		return false, nil
	}
	return true, m.writeCounts()
}

func (m *ext4Meta) writeCounts() error {
	if _, err := m.dev.WriteAt(m.gdt, m.gdtOff); err != nil {
		return fmt.Errorf("write group descriptors: %w", err)
	}
	if _, err := m.dev.WriteAt(m.sb, 1024); err != nil {
		return fmt.Errorf("write superblock: %w", err)
	}
	return nil
}

// count is recount in memory.
func (m *ext4Meta) count() error {
	le := binary.LittleEndian
	var freeB, freeI uint64
	bm := make([]byte, m.bs)
	for g := 0; g < m.groups; g++ {
		inGroup := uint64(m.bpg)
		if last := m.blocksCount - m.firstData - uint64(g)*uint64(m.bpg); last < inGroup {
			inGroup = last
		}
		fl := m.flags(g)
		if fl&bgBlockUninit == 0 {
			if _, err := m.dev.ReadAt(bm, m.blockBitmap(g)); err != nil {
				return fmt.Errorf("read block bitmap %d: %w", g, err)
			}
			m.setField16(g, 0x0c, 0x2c, uint32(zeros(bm, int(inGroup))))
			if m.metaCsum {
				c := crc.CRC32c(m.seed, bm[:m.bpg/8])
				m.setField16(g, 0x18, 0x38, c)
			}
		}
		if fl&bgInodeUninit == 0 {
			ib := bm[:m.ipg/8]
			if _, err := m.dev.ReadAt(ib, m.inodeBitmap(g)); err != nil {
				return fmt.Errorf("read inode bitmap %d: %w", g, err)
			}
			m.setField16(g, 0x0e, 0x2e, uint32(zeros(ib, int(m.ipg))))
			if m.metaCsum {
				m.setField16(g, 0x1a, 0x3a, crc.CRC32c(m.seed, ib))
			}
		}
		freeB += m.field(g, 0x0c, 0x2c, 2)
		freeI += m.field(g, 0x0e, 0x2e, 2)
		m.sealDesc(g)
	}
	le.PutUint32(m.sb[0x0c:], uint32(freeB))
	le.PutUint32(m.sb[0x158:], uint32(freeB>>32))
	le.PutUint32(m.sb[0x10:], uint32(freeI))
	if m.metaCsum {
		le.PutUint32(m.sb[0x3fc:], crc.CRC32c(0xffffffff, m.sb[:0x3fc]))
	}
	return nil
}

// sealDesc recomputes group descriptor g's checksum.
func (m *ext4Meta) sealDesc(g int) {
	d, le := m.desc(g), binary.LittleEndian
	var num [4]byte
	le.PutUint32(num[:], uint32(g))
	le.PutUint16(d[0x1e:], 0)
	switch {
	case m.metaCsum:
		le.PutUint16(d[0x1e:], uint16(crc.CRC32c(crc.CRC32c(m.seed, num[:]), d)))
	case m.gdtC:
		c := crc.CRC16(0xffff, m.sb[0x68:0x78])
		c = crc.CRC16(c, num[:])
		c = crc.CRC16(c, d[:0x1e])
		if len(d) > 0x20 {
			c = crc.CRC16(c, d[0x20:])
		}
		le.PutUint16(d[0x1e:], c)
	}
}

// zeros counts the clear bits among the first n bits of b.
func zeros(b []byte, n int) int {
	z := 0
	for _, x := range b[:n/8] {
		z += 8 - bits.OnesCount8(x)
	}
	for i := n &^ 7; i < n; i++ {
		if b[i/8]&(1<<(i%8)) == 0 {
			z++
		}
	}
	return z
}
