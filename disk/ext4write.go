package disk

// This file writes an open ext4 file's dirty pages into the file's own
// blocks, so that an fsync costs what was written since the last one.
// go-diskfs v1.9.4 can neither write a file's blocks in place at any
// offset (#429) nor rename on ext4, so without this every flush rewrote
// the whole file, twice.
//
// A flush runs in up to four epochs, each ended by a Device.Sync, so that
// no crash can show a file that no one wrote:
//
//	B  data: dirty pages into blocks already mapped (in place) and into
//	   newly allocated, still-free blocks; new extent leaf blocks; and,
//	   when blocks change hands, an intent record in the superblock
//	C  the block bitmaps, group descriptors and superblock counts that
//	   mark the new blocks used
//	D  the inode: size, extent root (i_block), i_blocks. One sector
//	   write, so the file switches from its old to its new layout at once
//	E  the bitmaps and counts that free the blocks the old layout held
//	   and the new one dropped (truncation, replaced leaf blocks); then
//	   the intent record cleared, made durable by the next sync. With
//	   nothing to free (an append that keeps the extents inline) there is
//	   no epoch E: the record is cleared after D, with no sync of its own
//
// Each sync is what keeps a power loss from reordering what the Device
// wrote before it; the data of B goes to the Device in runs as long as
// the file is contiguous on disk (writeGather), not page by page.
//
// Between C and E the bitmaps and the inode disagree, which e2fsck would
// report. The intent record (inode number and the block runs that change
// hands) lets the next writable OpenFS repair that: each listed block is
// marked used exactly when the inode now references it (recoverExt4).
// A leaf block is never rewritten while an inode references it: a changed
// tree gets new leaf blocks, so epoch D alone decides which tree is live.
//
// What is not handled here falls back to the whole-file path in
// fs_file.go (errFallback): inodes without extents, trees deeper than one
// level or with more than four leaves, unwritten (preallocated) extents,
// more block runs changing hands than the intent record holds, and
// allocations that would need an uninitialised (BLOCK_UNINIT) block group
// on a meta_bg volume. Elsewhere such a group is initialised by the flush
// that first allocates in it: its computed bitmap written in epoch B, the
// flag cleared with the new bitmap in C.

import (
	"encoding/binary"
	"errors"
	"fmt"
	"slices"
	"sort"
	"time"

	"github.com/diskfs/go-diskfs/filesystem/ext4/crc"
)

const (
	// intentOff is where the intent record lives: the superblock's
	// reserved padding (0x288-0x3fb), which e2fsck ignores and go-diskfs
	// writes back as zeros whenever it writes the superblock. Only a
	// flush of ours is ever in progress while a record is set.
	intentOff   = 0x300
	intentMagic = 0x3149474b // "KGI1"
	// intentMax is how many runs fit between intentOff and the checksum.
	intentMax         = (0x3fc - intentOff - 12) / 12
	inodeFlagHugeFile = 0x40000
	maxExtentLen      = 32768 // an initialised extent's longest run
)

// errFallback means a file's layout is beyond what flushExt4 supports; the
// caller stores the file the old way. Nothing was written.
var errFallback = errors.New("file layout beyond in-place writes")

// ext4Flush is the plan of one in-place flush, computed before anything
// is written.
type ext4Flush struct {
	m        *ext4Meta
	ino      uint32
	inode    []byte
	ext      []extent // the new layout, in file order
	oldIndex []uint64
	leaves   [][]byte // new leaf blocks (depth 1), with their numbers in leafAt
	leafAt   []uint64
	alloc    []extent // runs to mark used (data and leaves)
	free     []extent // runs to mark free (dropped data, replaced leaves)
	tree     bool     // the extent tree changes
	size     int64
	sizeOld  int64
	bm       *bitmaps
	synced   bool // epoch B is written and synced (a writeback's goroutine did it)
}

// bitmaps caches block bitmaps read (and changed) during one flush.
type bitmaps struct {
	m     *ext4Meta
	maps  map[int][]byte
	dirty map[int]bool
	// uninit holds the groups still BLOCK_UNINIT on disk whose bitmap
	// was computed here (as the kernel's ext4_init_block_bitmap does):
	// run writes that computed bitmap before the sync that ends epoch B,
	// so that when write clears the flag in epoch C the block on disk
	// is a valid bitmap whichever of the two writes a crash keeps.
	uninit map[int]bool
}

func (b *bitmaps) get(g int) ([]byte, error) {
	if bm, ok := b.maps[g]; ok {
		return bm, nil
	}
	if b.m.flags(g)&bgBlockUninit != 0 {
		if binary.LittleEndian.Uint32(b.m.sb[0x60:])&incompatMetaBG != 0 {
			return nil, errFallback // meta_bg: superblock copies not computed here
		}
		if b.uninit == nil {
			b.uninit = map[int]bool{}
		}
		b.uninit[g] = true
		b.maps[g] = b.m.computedBlockBitmap(g)
		return b.maps[g], nil
	}
	bm := make([]byte, b.m.bs)
	if _, err := b.m.dev.ReadAt(bm, b.m.blockBitmap(g)); err != nil {
		return nil, fmt.Errorf("read block bitmap %d: %w", g, err)
	}
	b.maps[g] = bm
	return bm, nil
}

func (b *bitmaps) set(blk uint64, used bool) error {
	if blk < b.m.firstData || blk >= b.m.blocksCount {
		return fmt.Errorf("block %d is outside the filesystem", blk)
	}
	g, i := int((blk-b.m.firstData)/uint64(b.m.bpg)), (blk-b.m.firstData)%uint64(b.m.bpg)
	bm, err := b.get(g)
	if err != nil {
		return err
	}
	if used {
		bm[i/8] |= 1 << (i % 8)
	} else {
		bm[i/8] &^= 1 << (i % 8)
	}
	b.dirty[g] = true
	return nil
}

// alloc takes up to n free blocks in one run, at goal or after it
// (wrapping around), and marks them used in the cached bitmaps.
func (b *bitmaps) alloc(goal, n uint64) (extent, error) {
	m := b.m
	if goal < m.firstData || goal >= m.blocksCount {
		goal = m.firstData
	}
	g0 := int((goal - m.firstData) / uint64(m.bpg))
	for k := 0; k <= m.groups; k++ {
		g := (g0 + k) % m.groups
		bm, err := b.get(g)
		if errors.Is(err, errFallback) {
			continue
		} else if err != nil {
			return extent{}, err
		}
		start := m.firstData + uint64(g)*uint64(m.bpg)
		end := min(start+uint64(m.bpg), m.blocksCount)
		from := start
		if k == 0 {
			from = goal
		}
		for blk := from; blk < end; blk++ {
			i := blk - start
			if bm[i/8] == 0xff && i%8 == 0 {
				blk += 7
				continue
			}
			if bm[i/8]&(1<<(i%8)) != 0 {
				continue
			}
			e := extent{phys: blk}
			for blk < end && uint64(e.count) < n && bm[(blk-start)/8]&(1<<((blk-start)%8)) == 0 {
				bm[(blk-start)/8] |= 1 << ((blk - start) % 8)
				e.count++
				blk++
			}
			b.dirty[g] = true
			return e, nil
		}
	}
	// full (or only meta_bg groups left uninitialised); the old path
	// (go-diskfs) reports ErrNoSpace if it finds no room either
	return extent{}, errFallback
}

// planExt4 works out the flush of of without writing anything.
func (f *FS) planExt4(of *openFile) (*ext4Flush, error) {
	m, err := readExt4Meta(f.dev)
	if err != nil {
		return nil, err
	}
	ino, err := f.inodeOf(of.path)
	if err != nil {
		return nil, err
	}
	in, err := m.readInode(ino)
	if err != nil {
		return nil, err
	}
	le := binary.LittleEndian
	if le.Uint32(in[0x20:])&inodeFlagExtents == 0 || le.Uint16(in[0x28+6:]) > 1 {
		return nil, errFallback
	}
	old, index, err := m.extents(in)
	if err != nil {
		return nil, fmt.Errorf("inode %d: %w", ino, err)
	}
	for _, e := range old {
		if e.unwritten {
			return nil, errFallback
		}
	}
	bs := m.bs
	p := &ext4Flush{m: m, ino: ino, inode: in, oldIndex: index, size: of.size,
		sizeOld: int64(le.Uint32(in[0x04:])) | int64(le.Uint32(in[0x6c:]))<<32,
		bm:      &bitmaps{m: m, maps: map[int][]byte{}, dirty: map[int]bool{}}}
	// blocks at or past keep hold content truncated away since the last
	// flush: they are dropped, and any page rewritten there gets new ones
	keep := uint64((of.baseLen + bs - 1) / bs)
	nblocks := uint64((of.size + bs - 1) / bs)
	for _, e := range old {
		switch {
		case e.logical+uint64(e.count) <= keep:
			p.ext = append(p.ext, e)
		case e.logical >= keep:
			p.free = append(p.free, extent{phys: e.phys, count: e.count})
		default:
			n := uint32(keep - e.logical)
			p.ext = append(p.ext, extent{logical: e.logical, phys: e.phys, count: n})
			p.free = append(p.free, extent{phys: e.phys + uint64(n), count: e.count - n})
		}
	}
	// unmapped blocks under dirty pages get new blocks, placed after the
	// block mapped just before them so that files stay contiguous
	var need []uint64
	for _, idx := range sortedPages(of) {
		first := uint64(idx * pageSize / bs)
		for b := first; b < first+uint64(pageSize/bs) && b < nblocks; b++ {
			if _, ok := lookup(p.ext, b); !ok {
				need = append(need, b)
			}
		}
	}
	goal := m.firstData + uint64((ino-1)/m.ipg)*uint64(m.bpg)
	for i := 0; i < len(need); {
		j := i + 1
		for j < len(need) && need[j] == need[j-1]+1 {
			j++
		}
		if g, ok := after(p.ext, need[i]); ok {
			goal = g
		}
		for l, n := need[i], uint64(j-i); n > 0; {
			e, err := p.bm.alloc(goal, min(n, maxExtentLen))
			if err != nil {
				return nil, err
			}
			p.alloc = append(p.alloc, e)
			p.ext = append(p.ext, extent{logical: l, phys: e.phys, count: e.count})
			l, n, goal = l+uint64(e.count), n-uint64(e.count), e.phys+uint64(e.count)
		}
		i = j
	}
	p.ext = mergeExtents(p.ext)
	p.tree = !slices.Equal(p.ext, old)
	if p.tree {
		if err := p.buildTree(); err != nil {
			return nil, err
		}
	}
	if len(mergeRuns(append(slices.Clone(p.alloc), p.free...))) > intentMax {
		return nil, errFallback
	}
	return p, nil
}

// buildTree lays out p.ext as the inode's extent tree: inline when four
// extents or fewer, else one level of new leaf blocks under i_block.
func (p *ext4Flush) buildTree() error {
	m, le := p.m, binary.LittleEndian
	for _, b := range p.oldIndex {
		p.free = append(p.free, extent{phys: b, count: 1})
	}
	if len(p.ext) <= 4 {
		return nil
	}
	per := int((m.bs - 12) / 12)
	if len(p.ext) > 4*per {
		return errFallback
	}
	goal := p.ext[len(p.ext)-1].phys
	var seed [4]byte
	le.PutUint32(seed[:], p.ino)
	csum := crc.CRC32c(crc.CRC32c(m.seed, seed[:]), p.inode[0x64:0x68])
	for i := 0; i < len(p.ext); i += per {
		chunk := p.ext[i:min(i+per, len(p.ext))]
		e, err := p.bm.alloc(goal, 1)
		if err != nil {
			return err
		}
		p.alloc = append(p.alloc, e)
		blk := make([]byte, m.bs)
		putHeader(blk, len(chunk), per, 0)
		for j, x := range chunk {
			putLeaf(blk[12+12*j:], x)
		}
		if m.metaCsum {
			le.PutUint32(blk[12+12*per:], crc.CRC32c(csum, blk[:12+12*per]))
		}
		p.leaves, p.leafAt = append(p.leaves, blk), append(p.leafAt, e.phys)
	}
	return nil
}

func putHeader(b []byte, entries, max, depth int) {
	le := binary.LittleEndian
	le.PutUint16(b, extentMagic)
	le.PutUint16(b[2:], uint16(entries))
	le.PutUint16(b[4:], uint16(max))
	le.PutUint16(b[6:], uint16(depth))
	le.PutUint32(b[8:], 0)
}

func putLeaf(b []byte, e extent) {
	le := binary.LittleEndian
	le.PutUint32(b, uint32(e.logical))
	le.PutUint16(b[4:], uint16(e.count))
	le.PutUint16(b[6:], uint16(e.phys>>32))
	le.PutUint32(b[8:], uint32(e.phys))
}

// newInode is the inode as epoch D writes it.
func (p *ext4Flush) newInode() []byte {
	in, le := slices.Clone(p.inode), binary.LittleEndian
	le.PutUint32(in[0x04:], uint32(p.size))
	le.PutUint32(in[0x6c:], uint32(p.size>>32))
	now := uint32(time.Now().Unix())
	le.PutUint32(in[0x0c:], now)
	le.PutUint32(in[0x10:], now)
	if !p.tree {
		return in
	}
	root := in[0x28 : 0x28+60]
	clear(root)
	blocks := uint64(len(p.leaves))
	for _, e := range p.ext {
		blocks += uint64(e.count)
	}
	if p.leaves == nil {
		putHeader(root, len(p.ext), 4, 0)
		for i, e := range p.ext {
			putLeaf(root[12+12*i:], e)
		}
	} else {
		putHeader(root, len(p.leaves), 4, 1)
		for i, at := range p.leafAt {
			x := root[12+12*i:]
			le.PutUint32(x, uint32(p.ext[i*int((p.m.bs-12)/12)].logical))
			le.PutUint32(x[4:], uint32(at))
			le.PutUint16(x[8:], uint16(at>>32))
		}
	}
	if le.Uint32(in[0x20:])&inodeFlagHugeFile == 0 {
		blocks *= uint64(p.m.bs / 512)
	}
	le.PutUint32(in[0x1c:], uint32(blocks))
	le.PutUint16(in[0x74:], uint16(blocks>>32))
	return in
}

// flushExt4 writes of's dirty pages in place and makes them durable, in
// the epochs described at the top of this file. It returns errFallback,
// having written nothing, when the file's layout is beyond it.
func (f *FS) flushExt4(of *openFile) error {
	p, err := f.startExt4(of)
	if err != nil {
		return err
	}
	return f.finishExt4(of, p)
}

// startExt4 plans the flush of of's pages and writes epoch B (the data,
// the new leaves, the intent), without waiting for it: finishExt4 does
// the rest, from B's sync on. Between the two, nothing else may change
// the filesystem (see FS.settle); of's pages may be written, as its
// readers read them and not the blocks.
func (f *FS) startExt4(of *openFile) (*ext4Flush, error) {
	p, err := f.planExt4(of)
	if err != nil {
		return nil, err
	}
	if err := p.start(of); err != nil {
		return nil, f.failedExt4(of, err)
	}
	return p, nil
}

// beginExt4 plans the flush of of's pages and writes epoch B's metadata,
// with f.mu held, and returns the pages whose data completes B: a
// writeback writes them and syncs on its own goroutine, without the lock
// (writeBack), then finishExt4 does the rest once B is synced.
func (f *FS) beginExt4(of *openFile) (*ext4Flush, []dataPage, error) {
	p, err := f.planExt4(of)
	if err != nil {
		return nil, nil, err
	}
	if err := p.startMeta(); err != nil {
		return nil, nil, f.failedExt4(of, err)
	}
	return p, snapshotPages(of), nil
}

// finishExt4 completes a flush startExt4 or beginExt4 began.
func (f *FS) finishExt4(of *openFile, p *ext4Flush) error {
	if err := p.finish(); err != nil {
		return f.failedExt4(of, err)
	}
	if p.tree || len(p.alloc)+len(p.free) > 0 || p.size != p.sizeOld {
		// go-diskfs keeps the superblock and group descriptors in memory
		return f.reload()
	}
	return nil
}

// failedExt4 repairs what a failed flush of of left, as after a crash:
// the bitmaps go right before anything else.
func (f *FS) failedExt4(of *openFile, err error) error {
	if rerr := f.recoverExt4(); rerr != nil {
		err = fmt.Errorf("%w (and repairing the bitmaps failed: %v)", err, rerr)
	}
	return fmt.Errorf("write %s: %w", display(of.path), err)
}

// run writes the whole flush, epoch B to the end.
func (p *ext4Flush) run(of *openFile) error {
	if err := p.start(of); err != nil {
		return err
	}
	return p.finish()
}

// start writes epoch B: the data, the new leaves, the intent.
func (p *ext4Flush) start(of *openFile) error {
	if err := p.writeData(snapshotPages(of)); err != nil {
		return err
	}
	return p.startMeta()
}

// startMeta writes epoch B's metadata: the new leaves, the computed
// bitmaps of groups first allocated in, the intent. Within the epoch its
// order against the data does not matter: the sync that ends B covers
// both.
func (p *ext4Flush) startMeta() error {
	m, dev := p.m, p.m.dev
	bs := m.bs
	for i, blk := range p.leaves {
		if _, err := dev.WriteAt(blk, int64(p.leafAt[i])*bs); err != nil {
			return fmt.Errorf("write extent leaf: %w", err)
		}
	}
	for g := range p.bm.uninit {
		if _, err := dev.WriteAt(m.computedBlockBitmap(g), m.blockBitmap(g)); err != nil {
			return fmt.Errorf("initialise block bitmap %d: %w", g, err)
		}
	}
	if len(p.alloc)+len(p.free) > 0 {
		m.setIntent(p.ino, mergeRuns(append(slices.Clone(p.alloc), p.free...)))
		if err := m.writeSuper(); err != nil {
			return err
		}
	}
	return nil
}

// finish makes epoch B durable and writes the epochs after it.
func (p *ext4Flush) finish() error {
	m, dev := p.m, p.m.dev
	moving := len(p.alloc)+len(p.free) > 0
	if !p.tree && p.size == p.sizeOld {
		// only the times change: no layout to order against the data
		return errors.Join(m.writeInode(p.ino, p.newInode()), dev.Sync())
	}
	if !p.synced {
		if err := dev.Sync(); err != nil {
			return err
		}
	}
	// C: the new blocks marked used
	if len(p.alloc) > 0 {
		if err := p.bm.write(); err != nil {
			return err
		}
		if err := dev.Sync(); err != nil {
			return err
		}
	}
	// D: the inode switches to the new layout
	if err := m.writeInode(p.ino, p.newInode()); err != nil {
		return err
	}
	if err := dev.Sync(); err != nil {
		return err
	}
	if !moving {
		return nil
	}
	// E: the dropped blocks freed, the intent cleared. With nothing to
	// free (an append), the bitmaps already claim exactly what the inode
	// references, so the intent can go without another sync.
	if len(p.free) > 0 {
		for _, e := range p.free {
			for b := e.phys; b < e.phys+uint64(e.count); b++ {
				if err := p.bm.set(b, false); err != nil {
					return err
				}
			}
		}
		if err := p.bm.write(); err != nil {
			return err
		}
		// the intent goes only once the bitmaps are durable: within one
		// epoch the Device writes in sector order, superblock first
		if err := dev.Sync(); err != nil {
			return err
		}
	}
	// Its clearing needs no sync of its own: a record that outlives the
	// flush names blocks the inode references exactly as the bitmaps say,
	// so a repair from it changes nothing; and it cannot outlive the next
	// sync, which every later change ends with (nor can a block it names
	// change owner before then).
	m.setIntent(0, nil)
	return m.writeSuper()
}

// dataRun bounds the runs writeData hands the Device at once (the Device
// writes them in chunks of its own).
const dataRun = 16 << 20

// dataPage is one dirty page of a file, by page index.
type dataPage struct {
	idx int64
	pg  []byte
}

// snapshotPages lists of's dirty pages in file order, as writeData takes
// them.
func snapshotPages(of *openFile) []dataPage {
	idx := sortedPages(of)
	pages := make([]dataPage, len(idx))
	for i, x := range idx {
		pages[i] = dataPage{x, of.pages[x]}
	}
	return pages
}

// writeData writes the dirty pages to the blocks p maps them to, handing
// the Device each run of pages that follow each other on disk at once, so
// that the file gets few large pwrites and the cipher every core. It
// reads only p and the pages, never the openFile, so a writeback runs it
// without the FS lock (writeBack).
func (p *ext4Flush) writeData(pages []dataPage) error {
	bs := p.m.bs
	nblocks := uint64((p.size + bs - 1) / bs)
	var run [][]byte
	var runAt, runLen int64
	write := func() error {
		if len(run) == 0 {
			return nil
		}
		err := p.m.dev.writeGather(run, runAt)
		clear(run)
		run, runLen = run[:0], 0
		if err != nil {
			return fmt.Errorf("write data: %w", err)
		}
		return nil
	}
	for _, dp := range pages {
		idx, pg := dp.idx, dp.pg
		first := uint64(idx * pageSize / bs)
		for b := first; b < first+uint64(pageSize/bs) && b < nblocks; {
			phys, _ := lookup(p.ext, b)
			n := uint64(1)
			for b+n < first+uint64(pageSize/bs) && b+n < nblocks {
				if q, ok := lookup(p.ext, b+n); !ok || q != phys+n {
					break
				}
				n++
			}
			at := int64(phys) * bs
			if len(run) > 0 && (runAt+runLen != at || runLen >= dataRun) {
				if err := write(); err != nil {
					return err
				}
			}
			if len(run) == 0 {
				runAt = at
			}
			off := int64(b-first) * bs
			run = append(run, pg[off:off+int64(n)*bs])
			runLen += int64(n) * bs
			b += n
		}
	}
	return write()
}

// write stores the changed bitmaps, their groups' free counts and
// checksums, and the superblock's free count.
func (b *bitmaps) write() error {
	m, le := b.m, binary.LittleEndian
	for g := range b.dirty {
		bm := b.maps[g]
		if _, err := m.dev.WriteAt(bm, m.blockBitmap(g)); err != nil {
			return fmt.Errorf("write block bitmap %d: %w", g, err)
		}
		if b.uninit[g] {
			d := m.desc(g)
			binary.LittleEndian.PutUint16(d[0x12:], m.flags(g)&^bgBlockUninit)
			delete(b.uninit, g)
		}
		inGroup := min(uint64(m.bpg), m.blocksCount-m.firstData-uint64(g)*uint64(m.bpg))
		m.setField16(g, 0x0c, 0x2c, uint32(zeros(bm, int(inGroup))))
		if m.metaCsum {
			m.setField16(g, 0x18, 0x38, crc.CRC32c(m.seed, bm[:m.bpg/8]))
		}
		m.sealDesc(g)
		if _, err := m.dev.WriteAt(m.desc(g), m.gdtOff+int64(g*m.descSize)); err != nil {
			return fmt.Errorf("write group descriptor %d: %w", g, err)
		}
	}
	clear(b.dirty)
	var free uint64
	for g := 0; g < m.groups; g++ {
		free += m.field(g, 0x0c, 0x2c, 2)
	}
	le.PutUint32(m.sb[0x0c:], uint32(free))
	le.PutUint32(m.sb[0x158:], uint32(free>>32))
	return m.writeSuper()
}

// sortedPages lists of's pages in file order.
func sortedPages(of *openFile) []int64 {
	idx := make([]int64, 0, len(of.pages))
	for i := range of.pages {
		idx = append(idx, i)
	}
	slices.Sort(idx)
	return idx
}

// lookup maps file block b through es, sorted by logical block.
func lookup(es []extent, b uint64) (uint64, bool) {
	i := sort.Search(len(es), func(i int) bool { return es[i].logical+uint64(es[i].count) > b })
	if i < len(es) && es[i].logical <= b {
		return es[i].phys + (b - es[i].logical), true
	}
	return 0, false
}

// after is the block just past the extent that ends last before file
// block b: where a new run placed after it continues it on disk.
func after(es []extent, b uint64) (uint64, bool) {
	var goal uint64
	ok := false
	for _, e := range es {
		if e.logical < b {
			goal, ok = e.phys+uint64(e.count), true
		}
	}
	return goal, ok
}

// mergeExtents sorts es by file block and joins runs contiguous both in
// the file and on disk.
func mergeExtents(es []extent) []extent {
	slices.SortFunc(es, func(a, b extent) int { return int(int64(a.logical) - int64(b.logical)) })
	var out []extent
	for _, e := range es {
		if n := len(out); n > 0 {
			l := &out[n-1]
			if l.logical+uint64(l.count) == e.logical && l.phys+uint64(l.count) == e.phys && l.count+e.count <= maxExtentLen {
				l.count += e.count
				continue
			}
		}
		out = append(out, e)
	}
	return out
}

// mergeRuns sorts block runs and joins the adjacent ones.
func mergeRuns(rs []extent) []extent {
	slices.SortFunc(rs, func(a, b extent) int { return int(int64(a.phys) - int64(b.phys)) })
	var out []extent
	for _, r := range rs {
		if n := len(out); n > 0 && out[n-1].phys+uint64(out[n-1].count) == r.phys {
			out[n-1].count += r.count
			continue
		}
		out = append(out, r)
	}
	return out
}
