package disk

// go-diskfs v1.9.4 ignores ext4's lazy-init flags: it reads any group's
// block and inode bitmaps from disk when it looks for free space or a free
// inode. In an uninitialised group of an encrypted volume those blocks
// decrypt to garbage (and on a mkfs.ext4 volume they are stale or zero,
// which would hand out a backup superblock). lazyExt4 sits between
// go-diskfs and the Device and initialises a group the first time anything
// touches its bitmaps or inode table:
//
//   - BLOCK_UNINIT: the block bitmap is computed as the kernel does
//     (ext4_init_block_bitmap: the superblock and GDT copy, the group's own
//     bitmaps and inode table where they lie inside it, the padding past a
//     short last group), written, and the flag cleared;
//   - INODE_UNINIT: the inode table is zeroed and the inode bitmap written
//     empty (padding set), the flag cleared and ITABLE_ZEROED set.
//
// go-diskfs keeps the group descriptors in memory and rewrites the whole
// table after each change, which would bring the old flags back, so the
// descriptors of groups initialised here are patched in every GDT write.
// FS.reload builds a fresh lazyExt4 from the GDT on disk, where every
// initialisation has already been recorded.

import (
	"encoding/binary"
	"fmt"
	"sort"
	"sync"

	"github.com/diskfs/go-diskfs/backend"
	"github.com/diskfs/go-diskfs/filesystem/ext4/crc"
)

const incompatMetaBG = 0x10

type lazyRegion struct {
	start, end int64 // bytes
	g          int
	inodes     bool // inode bitmap or table; else the block bitmap
}

// lazyExt4 is the backend.Storage go-diskfs gets for an ext4 volume.
type lazyExt4 struct {
	*Device
	mu      sync.Mutex
	m       *ext4Meta
	regions []lazyRegion // the metadata of uninitialised groups, by start
	patched map[int]bool // groups initialised since the GDT was read
	// groups whose bitmap checksum (block, inode) is still the one set
	// here: go-diskfs's copy is stale until it writes that bitmap itself
	bbOurs, ibOurs map[int]bool
}

var (
	_ backend.Storage      = (*lazyExt4)(nil)
	_ backend.WritableFile = (*lazyExt4)(nil)
)

// newLazyExt4 returns dev unwrapped when no group needs initialising, or
// when the volume has no checksum feature (the flags then mean nothing)
// or uses meta_bg (whose superblock copies we do not compute).
func newLazyExt4(dev *Device, m *ext4Meta) backend.Storage {
	if !m.metaCsum && !m.gdtC || binary.LittleEndian.Uint32(m.sb[0x60:])&incompatMetaBG != 0 {
		return dev
	}
	l := &lazyExt4{Device: dev, m: m, patched: map[int]bool{}, bbOurs: map[int]bool{}, ibOurs: map[int]bool{}}
	itBytes := (int64(m.ipg)*int64(m.inodeSize) + m.bs - 1) / m.bs * m.bs
	for g := 0; g < m.groups; g++ {
		fl := m.flags(g)
		if fl&bgBlockUninit != 0 {
			l.regions = append(l.regions, lazyRegion{m.blockBitmap(g), m.blockBitmap(g) + m.bs, g, false})
		}
		if fl&bgInodeUninit != 0 {
			l.regions = append(l.regions,
				lazyRegion{m.inodeBitmap(g), m.inodeBitmap(g) + m.bs, g, true},
				lazyRegion{m.inodeTable(g), m.inodeTable(g) + itBytes, g, true})
		}
	}
	if len(l.regions) == 0 {
		return dev
	}
	sort.Slice(l.regions, func(i, j int) bool { return l.regions[i].start < l.regions[j].start })
	return l
}

// Writable returns the wrapper, so go-diskfs's writes pass through it too.
func (l *lazyExt4) Writable() (backend.WritableFile, error) {
	if _, err := l.Device.Writable(); err != nil {
		return nil, err
	}
	return l, nil
}

func (l *lazyExt4) ReadAt(p []byte, off int64) (int, error) {
	if err := l.prepare(off, int64(len(p))); err != nil {
		return 0, err
	}
	return l.Device.ReadAt(p, off)
}

func (l *lazyExt4) WriteAt(p []byte, off int64) (int, error) {
	if err := l.prepare(off, int64(len(p))); err != nil {
		return 0, err
	}
	gdtEnd := l.m.gdtOff + int64(len(l.m.gdt))
	if off < gdtEnd && off+int64(len(p)) > l.m.gdtOff {
		p = l.patchGDT(p, off)
	}
	// a bitmap go-diskfs writes is one whose checksum it now keeps
	l.mu.Lock()
	for g := range l.bbOurs {
		if off <= l.m.blockBitmap(g) && off+int64(len(p)) > l.m.blockBitmap(g) {
			delete(l.bbOurs, g)
		}
	}
	for g := range l.ibOurs {
		if off <= l.m.inodeBitmap(g) && off+int64(len(p)) > l.m.inodeBitmap(g) {
			delete(l.ibOurs, g)
		}
	}
	l.mu.Unlock()
	return l.Device.WriteAt(p, off)
}

// prepare initialises every uninitialised group whose metadata overlaps
// [off, off+n).
func (l *lazyExt4) prepare(off, n int64) error {
	if l.Device.readOnly {
		return nil // nothing is allocated on a read-only volume
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	i := sort.Search(len(l.regions), func(i int) bool { return l.regions[i].end > off })
	for ; i < len(l.regions) && l.regions[i].start < off+n; i++ {
		r := l.regions[i]
		if err := l.initGroup(r.g, r.inodes); err != nil {
			return fmt.Errorf("initialise ext4 block group %d: %w", r.g, err)
		}
	}
	return nil
}

func (l *lazyExt4) initGroup(g int, inodes bool) error {
	m, le := l.m, binary.LittleEndian
	fl := m.flags(g)
	d := m.desc(g)
	switch {
	case !inodes && fl&bgBlockUninit != 0:
		bm := m.computedBlockBitmap(g)
		if _, err := l.Device.WriteAt(bm, m.blockBitmap(g)); err != nil {
			return err
		}
		fl &^= bgBlockUninit
		l.bbOurs[g] = true
		if m.metaCsum {
			c := crc.CRC32c(m.seed, bm[:m.bpg/8])
			m.setField16(g, 0x18, 0x38, c)
		}
	case inodes && fl&bgInodeUninit != 0:
		zero := make([]byte, min(int64(4<<20), int64(m.ipg)*int64(m.inodeSize)))
		for done := int64(0); done < int64(m.ipg)*int64(m.inodeSize); done += int64(len(zero)) {
			n := min(int64(len(zero)), int64(m.ipg)*int64(m.inodeSize)-done)
			if _, err := l.Device.WriteAt(zero[:n], m.inodeTable(g)+done); err != nil {
				return err
			}
		}
		ib := make([]byte, m.bs)
		for i := int(m.ipg); i < len(ib)*8; i++ {
			ib[i/8] |= 1 << (i % 8)
		}
		if _, err := l.Device.WriteAt(ib, m.inodeBitmap(g)); err != nil {
			return err
		}
		fl = fl&^bgInodeUninit | bgInodeZeroed
		l.ibOurs[g] = true
		if m.metaCsum {
			m.setField16(g, 0x1a, 0x3a, crc.CRC32c(m.seed, ib[:m.ipg/8]))
		}
	default:
		return nil
	}
	le.PutUint16(d[0x12:], fl)
	m.sealDesc(g)
	l.patched[g] = true
	if _, err := l.Device.WriteAt(d, m.gdtOff+int64(g*m.descSize)); err != nil {
		return err
	}
	return nil
}

// patchGDT returns a copy of p, a write of go-diskfs's descriptor table at
// off, with the flags and bitmap checksums of the groups initialised here.
// go-diskfs's own free counts and unused-inode counts are kept.
func (l *lazyExt4) patchGDT(p []byte, off int64) []byte {
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.patched) == 0 {
		return p
	}
	q := append([]byte(nil), p...)
	m, le := l.m, binary.LittleEndian
	for g := range l.patched {
		at := m.gdtOff + int64(g*m.descSize) - off
		if at < 0 || at+int64(m.descSize) > int64(len(q)) {
			continue
		}
		d, ours := q[at:at+int64(m.descSize)], m.desc(g)
		le.PutUint16(d[0x12:], le.Uint16(ours[0x12:]))
		if l.bbOurs[g] {
			le.PutUint16(d[0x18:], le.Uint16(ours[0x18:]))
			le.PutUint16(d[0x38:], le.Uint16(ours[0x38:]))
		}
		if l.ibOurs[g] {
			le.PutUint16(d[0x1a:], le.Uint16(ours[0x1a:]))
			le.PutUint16(d[0x3a:], le.Uint16(ours[0x3a:]))
		}
		copy(ours, d)
		m.sealDesc(g)
		copy(d, ours)
	}
	return q
}

// computedBlockBitmap is group g's block bitmap as the kernel computes it
// for a BLOCK_UNINIT group.
func (m *ext4Meta) computedBlockBitmap(g int) []byte {
	bm := make([]byte, m.bs)
	start := m.firstData + uint64(g)*uint64(m.bpg)
	n := min(uint64(m.bpg), m.blocksCount-start)
	set := func(from, count uint64) {
		for b := max(from, start); b < min(from+count, start+n); b++ {
			i := b - start
			bm[i/8] |= 1 << (i % 8)
		}
	}
	if m.hasSuper(g) {
		gdtBlocks := (uint64(m.groups)*uint64(m.descSize) + uint64(m.bs) - 1) / uint64(m.bs)
		set(start, 1+gdtBlocks+uint64(binary.LittleEndian.Uint16(m.sb[0xce:])))
	}
	bs := uint64(m.bs)
	set(uint64(m.blockBitmap(g))/bs, 1)
	set(uint64(m.inodeBitmap(g))/bs, 1)
	set(uint64(m.inodeTable(g))/bs, (uint64(m.ipg)*uint64(m.inodeSize)+bs-1)/bs)
	for i := n; i < uint64(m.bs)*8; i++ {
		bm[i/8] |= 1 << (i % 8)
	}
	return bm
}

// hasSuper says whether group g holds a superblock copy: every group
// without sparse_super, else groups 0, 1 and powers of 3, 5 and 7.
func (m *ext4Meta) hasSuper(g int) bool {
	if binary.LittleEndian.Uint32(m.sb[0x64:])&roSparseSuper == 0 {
		return true
	}
	return hasSuper(g)
}
