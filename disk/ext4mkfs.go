package disk

// This file makes ext4 filesystems itself, instead of go-diskfs's
// ext4.Create, for two reasons:
//
//   - Cost. go-diskfs writes every group's bitmaps and zeroes every inode
//     table (4 MiB per 128 MiB group: 32 GiB for a 1 TiB volume), and its
//     layout code is quadratic in the number of groups (a minute of CPU for
//     1 TiB even with the writes thrown away).
//   - Encryption. A hole in the image decrypts to garbage, not zeros, so
//     the trick mkfs.ext4 uses on thin disks (trust unwritten blocks to read
//     as zeros) is not open to us. Instead we use ext4's lazy-init flags,
//     which say "not initialised, don't read": every group but group 0 is
//     INODE_UNINIT (its inode bitmap and table are never read), and every
//     group that holds no block of another group's metadata, of the journal
//     or of the root directory is BLOCK_UNINIT (its block bitmap is computed
//     from the geometry). ITABLE_ZEROED stays clear on them, so the Linux
//     kernel's ext4lazyinit thread zeroes those inode tables later, through
//     whatever block device carries the volume (keygate's NBD export
//     encrypts those zeros). e2fsck accepts all of this; go-diskfs does not
//     know the flags, which ext4lazy.go deals with.
//
// What is written, for any size: the superblock and group descriptors
// (primary and sparse_super backups), the block bitmaps of the groups
// named above (one group in 16 with flex_bg), group 0's inode bitmap and
// inode table (2 MiB), the root directory block, and the journal (at most
// 128 MiB, zeroed as mkfs.ext4 does by default). At 1 TiB that is about
// 150 MiB.
//
// The feature set is go-diskfs's own (which keygate has always made, and
// go-diskfs reads and writes), plus metadata_csum: the lazy-init flags are
// honoured only with a checksum feature, and go-diskfs computes the older
// gdt_csum (crc16) wrongly, while it handles metadata_csum (it also reads
// what mkfs.ext4 makes).

import (
	"crypto/rand"
	"encoding/binary"
	"fmt"
	"time"

	"github.com/diskfs/go-diskfs/filesystem/ext4/crc"
)

const (
	mkfsBlockSize  = 4096
	mkfsBPG        = 8 * mkfsBlockSize // blocks per group: one bitmap block
	mkfsInodeRatio = 16384             // bytes per inode, mkfs.ext4's default
	mkfsInodeSize  = 256
	mkfsDescSize   = 64
	mkfsFlexLog    = 4 // 16 groups per flex group, as mkfs.ext4
	mkfsFlex       = 1 << mkfsFlexLog
	mkfsFirstIno   = 11 // inodes 1-10 are reserved
	mkfsMinBlocks  = 2048
	rootInode      = 2
	journalIno     = 8

	bgInodeZeroed = 0x4

	compatHasJournal = 0x4
	compatExtAttr    = 0x8
	incompatFiletype = 0x2
	incompatExtents  = 0x40
	incompatFlexBG   = 0x200
	roSparseSuper    = 0x1
	roLargeFile      = 0x2
	roHugeFile       = 0x8
)

// ext4Plan is the geometry of a new filesystem: pure arithmetic on the
// size, so tests can check what will be written before anything is.
type ext4Plan struct {
	blocks     uint64
	groups     int
	ipg        uint32
	itb        uint64 // inode table blocks per group
	gdtBlocks  uint64
	bb, ib, it []uint64 // each group's block bitmap, inode bitmap, inode table
	root       uint64   // the root directory's one block
	journal    uint64   // first journal block
	jblocks    uint64
	initBlocks map[int]bool // groups whose block bitmap is written (BLOCK_UNINIT clear)
}

// hasSuper says whether group g carries a superblock and GDT copy under
// sparse_super: groups 0 and 1 and the powers of 3, 5 and 7.
func hasSuper(g int) bool {
	if g <= 1 {
		return true
	}
	for _, b := range []int{3, 5, 7} {
		n := b
		for n < g {
			n *= b
		}
		if n == g {
			return true
		}
	}
	return false
}

func (p *ext4Plan) groupStart(g int) uint64 { return uint64(g) * mkfsBPG }

func (p *ext4Plan) groupLen(g int) uint64 {
	return min(uint64(mkfsBPG), p.blocks-p.groupStart(g))
}

// baseMeta is the superblock and GDT copy at the start of group g, which
// the kernel and e2fsck also count in a BLOCK_UNINIT group.
func (p *ext4Plan) baseMeta(g int) uint64 {
	if hasSuper(g) {
		return 1 + p.gdtBlocks
	}
	return 0
}

// flexMeta is the bitmaps and inode tables that flex-group owner g (a
// multiple of 16) holds for its members; 0 for other groups.
func (p *ext4Plan) flexMeta(g int) uint64 {
	if g%mkfsFlex != 0 {
		return 0
	}
	m := uint64(min(mkfsFlex, p.groups-g))
	return m * (2 + p.itb)
}

// planExt4 lays out an ext4 filesystem of size bytes (4 KiB blocks).
func planExt4(size int64) (*ext4Plan, error) {
	p := &ext4Plan{blocks: uint64(size) / mkfsBlockSize}
	if p.blocks < mkfsMinBlocks {
		return nil, fmt.Errorf("%d bytes is too small for ext4 (at least %d MiB)", size, mkfsMinBlocks*mkfsBlockSize>>20)
	}
	for {
		p.groups = int((p.blocks + mkfsBPG - 1) / mkfsBPG)
		p.gdtBlocks = (uint64(p.groups)*mkfsDescSize + mkfsBlockSize - 1) / mkfsBlockSize
		inodes := p.blocks * mkfsBlockSize / mkfsInodeRatio
		perBlock := uint64(mkfsBlockSize / mkfsInodeSize)
		ipg := (inodes + uint64(p.groups) - 1) / uint64(p.groups)
		ipg = (ipg + perBlock - 1) / perBlock * perBlock
		p.ipg = uint32(min(max(ipg, perBlock), 8*mkfsBlockSize))
		p.itb = uint64(p.ipg) * mkfsInodeSize / mkfsBlockSize
		// a last group too short for its own metadata is dropped, as
		// mkfs.ext4 does; its few blocks are not worth a group
		last := p.groups - 1
		if last > 0 && p.groupLen(last) < p.baseMeta(last)+p.flexMeta(last)+50 {
			p.blocks = p.groupStart(last)
			continue
		}
		break
	}
	if uint64(p.ipg)*uint64(p.groups) >= 1<<32 {
		return nil, fmt.Errorf("%d bytes needs more than 2^32 inodes", size)
	}
	p.bb, p.ib, p.it = make([]uint64, p.groups), make([]uint64, p.groups), make([]uint64, p.groups)
	// flex_bg: owner group o holds, after its superblock copy, the block
	// bitmaps of its members, then their inode bitmaps, then their tables
	for o := 0; o < p.groups; o += mkfsFlex {
		m := min(mkfsFlex, p.groups-o)
		start := p.groupStart(o) + p.baseMeta(o)
		for k := 0; k < m; k++ {
			p.bb[o+k] = start + uint64(k)
			p.ib[o+k] = start + uint64(m+k)
			p.it[o+k] = start + uint64(2*m) + uint64(k)*p.itb
		}
	}
	// the root directory's block, then the journal as one extent, in the
	// first free run long enough
	p.root = p.baseMeta(0) + p.flexMeta(0)
	p.jblocks = min(max(p.blocks/32, 1024), 32768) // go-diskfs's sizes: 4 to 128 MiB
	for g := 0; g < p.groups; g++ {
		from := p.groupStart(g) + p.baseMeta(g) + p.flexMeta(g)
		if g == 0 {
			from = p.root + 1
		}
		if end := p.groupStart(g) + p.groupLen(g); end >= from+p.jblocks {
			p.journal = from
			break
		}
	}
	if p.journal == 0 {
		return nil, fmt.Errorf("%d bytes is too small for ext4 with a %d-block journal", size, p.jblocks)
	}
	p.initBlocks = map[int]bool{0: true, p.groups - 1: true, int(p.journal / mkfsBPG): true}
	for o := 0; o < p.groups; o += mkfsFlex {
		p.initBlocks[o] = true
	}
	return p, nil
}

// blockBitmap computes group g's block bitmap and its count of free blocks.
func (p *ext4Plan) blockBitmap(g int) ([]byte, uint64) {
	bm := make([]byte, mkfsBlockSize)
	start, n := p.groupStart(g), p.groupLen(g)
	set := func(from, count uint64) {
		for b := max(from, start); b < min(from+count, start+n); b++ {
			i := b - start
			bm[i/8] |= 1 << (i % 8)
		}
	}
	set(start, p.baseMeta(g))
	set(start+p.baseMeta(g), p.flexMeta(g))
	set(p.root, 1)
	set(p.journal, p.jblocks)
	free := uint64(zeros(bm, int(n)))
	for i := n; i < mkfsBPG; i++ {
		bm[i/8] |= 1 << (i % 8) // past the end of a short last group
	}
	return bm, free
}

// mkfsExt4 writes a new ext4 filesystem over the whole of dev.
func mkfsExt4(dev *Device, label string) error {
	p, err := planExt4(dev.Size())
	if err != nil {
		return err
	}
	var uuid, hashSeed [16]byte
	if _, err := rand.Read(uuid[:]); err != nil {
		return err
	}
	if _, err := rand.Read(hashSeed[:]); err != nil {
		return err
	}
	uuid[6] = uuid[6]&0x0f | 0x40 // version 4
	uuid[8] = uuid[8]&0x3f | 0x80
	seed := crc.CRC32c(0xffffffff, uuid[:])
	now := uint32(time.Now().Unix())
	le := binary.LittleEndian

	gdt := make([]byte, p.gdtBlocks*mkfsBlockSize)
	var freeBlocks uint64
	for g := 0; g < p.groups; g++ {
		d := gdt[g*mkfsDescSize : (g+1)*mkfsDescSize]
		put64 := func(lo, hi int, v uint64) {
			le.PutUint32(d[lo:], uint32(v))
			le.PutUint32(d[hi:], uint32(v>>32))
		}
		put64(0x00, 0x20, p.bb[g])
		put64(0x04, 0x24, p.ib[g])
		put64(0x08, 0x28, p.it[g])
		free, flags := p.groupLen(g)-p.baseMeta(g)-p.flexMeta(g), uint16(bgInodeUninit)
		if p.initBlocks[g] {
			var bm []byte
			bm, free = p.blockBitmap(g)
			c := crc.CRC32c(seed, bm[:mkfsBPG/8])
			le.PutUint16(d[0x18:], uint16(c))
			le.PutUint16(d[0x38:], uint16(c>>16))
			if _, err := dev.WriteAt(bm, int64(p.bb[g])*mkfsBlockSize); err != nil {
				return fmt.Errorf("write block bitmap %d: %w", g, err)
			}
		} else {
			flags |= bgBlockUninit
		}
		freeInodes := p.ipg
		if g == 0 {
			freeInodes -= mkfsFirstIno - 1
			flags = bgInodeZeroed
			le.PutUint16(d[0x10:], 1) // used directories: the root
			ib := make([]byte, mkfsBlockSize)
			for i := 0; i < mkfsBlockSize*8; i++ {
				if i < mkfsFirstIno-1 || i >= int(p.ipg) {
					ib[i/8] |= 1 << (i % 8) // reserved inodes, and the padding
				}
			}
			c := crc.CRC32c(seed, ib[:p.ipg/8])
			le.PutUint16(d[0x1a:], uint16(c))
			le.PutUint16(d[0x3a:], uint16(c>>16))
			if _, err := dev.WriteAt(ib, int64(p.ib[0])*mkfsBlockSize); err != nil {
				return fmt.Errorf("write inode bitmap 0: %w", err)
			}
		}
		freeBlocks += free
		le.PutUint16(d[0x0e:], uint16(freeInodes))
		le.PutUint16(d[0x2e:], uint16(freeInodes>>16))
		le.PutUint16(d[0x0c:], uint16(free))
		le.PutUint16(d[0x2c:], uint16(free>>16))
		le.PutUint16(d[0x12:], flags)
		le.PutUint16(d[0x1c:], uint16(freeInodes)) // itable_unused
		le.PutUint16(d[0x32:], uint16(freeInodes>>16))
		var num [4]byte
		le.PutUint32(num[:], uint32(g))
		le.PutUint16(d[0x1e:], uint16(crc.CRC32c(crc.CRC32c(seed, num[:]), d)))
	}

	if err := writeRootAndJournal(dev, p, uuid, seed, now); err != nil {
		return err
	}

	sb := make([]byte, 1024)
	le.PutUint32(sb[0x00:], p.ipg*uint32(p.groups))
	le.PutUint32(sb[0x04:], uint32(p.blocks))
	le.PutUint32(sb[0x150:], uint32(p.blocks>>32))
	le.PutUint32(sb[0x0c:], uint32(freeBlocks))
	le.PutUint32(sb[0x158:], uint32(freeBlocks>>32))
	le.PutUint32(sb[0x10:], p.ipg*uint32(p.groups)-(mkfsFirstIno-1))
	le.PutUint32(sb[0x18:], 2) // log2(4096) - 10
	le.PutUint32(sb[0x1c:], 2)
	le.PutUint32(sb[0x20:], mkfsBPG)
	le.PutUint32(sb[0x24:], mkfsBPG)
	le.PutUint32(sb[0x28:], p.ipg)
	le.PutUint32(sb[0x30:], now)
	le.PutUint16(sb[0x36:], 0xffff) // no mount-count fsck
	le.PutUint16(sb[0x38:], 0xef53)
	le.PutUint16(sb[0x3a:], 1) // clean
	le.PutUint16(sb[0x3c:], 1) // errors=continue
	le.PutUint32(sb[0x40:], now)
	le.PutUint32(sb[0x4c:], 1) // dynamic revision
	le.PutUint32(sb[0x54:], mkfsFirstIno)
	le.PutUint16(sb[0x58:], mkfsInodeSize)
	le.PutUint32(sb[0x5c:], compatHasJournal|compatExtAttr)
	le.PutUint32(sb[0x60:], incompatFiletype|incompatExtents|incompat64Bit|incompatFlexBG)
	le.PutUint32(sb[0x64:], roSparseSuper|roLargeFile|roHugeFile|roCompatMetaCsum)
	copy(sb[0x68:0x78], uuid[:])
	copy(sb[0x78:0x88], label)
	le.PutUint32(sb[0xe0:], journalIno)
	copy(sb[0xec:0xfc], hashSeed[:])
	sb[0xfc] = 1 // half_md4
	sb[0xfd] = 1 // s_jnl_blocks holds a copy of the journal inode's extents
	le.PutUint16(sb[0xfe:], mkfsDescSize)
	le.PutUint32(sb[0x108:], now)
	copy(sb[0x10c:0x148], journalIBlock(p))
	le.PutUint32(sb[0x14c:], uint32(p.jblocks*mkfsBlockSize)) // s_jnl_blocks[16]: i_size
	le.PutUint16(sb[0x15c:], 32)
	le.PutUint16(sb[0x15e:], 32)
	le.PutUint32(sb[0x160:], 1) // signed directory hash, as on x86
	sb[0x174] = mkfsFlexLog
	sb[0x175] = 1 // crc32c
	// the primary last: until it is written, no tool opens the volume as
	// ext4 (go-diskfs and the kernel look only at the primary)
	for g := p.groups - 1; g >= 0; g-- {
		if !hasSuper(g) {
			continue
		}
		le.PutUint16(sb[0x5a:], uint16(g))
		le.PutUint32(sb[0x3fc:], crc.CRC32c(0xffffffff, sb[:0x3fc]))
		at := int64(p.groupStart(g)) * mkfsBlockSize
		if _, err := dev.WriteAt(gdt, at+mkfsBlockSize); err != nil {
			return fmt.Errorf("write group descriptors of group %d: %w", g, err)
		}
		if g == 0 {
			at += 1024
		}
		if _, err := dev.WriteAt(sb, at); err != nil {
			return fmt.Errorf("write superblock of group %d: %w", g, err)
		}
	}
	return nil
}

// journalIBlock is the journal inode's i_block: an extent tree root with
// one extent over the whole journal.
func journalIBlock(p *ext4Plan) []byte {
	return extentRoot(p.journal, uint32(p.jblocks))
}

func extentRoot(start uint64, n uint32) []byte {
	b, le := make([]byte, 60), binary.LittleEndian
	le.PutUint16(b[0:], extentMagic)
	le.PutUint16(b[2:], 1) // entries
	le.PutUint16(b[4:], 4) // capacity in i_block
	le.PutUint32(b[12:], 0)
	le.PutUint16(b[16:], uint16(n))
	le.PutUint16(b[18:], uint16(start>>32))
	le.PutUint32(b[20:], uint32(start))
	return b
}

// writeRootAndJournal writes group 0's inode table (zeros but for the root
// and journal inodes), the root directory block and the journal.
func writeRootAndJournal(dev *Device, p *ext4Plan, uuid [16]byte, seed, now uint32) error {
	le := binary.LittleEndian
	table := make([]byte, p.itb*mkfsBlockSize)
	inode := func(ino uint32, mode uint16, size uint64, links uint16, blocks uint64, ib []byte) {
		b := table[(ino-1)*mkfsInodeSize : ino*mkfsInodeSize]
		le.PutUint16(b[0x00:], mode)
		le.PutUint32(b[0x04:], uint32(size))
		le.PutUint32(b[0x6c:], uint32(size>>32))
		for _, o := range []int{0x08, 0x0c, 0x10, 0x90} { // atime, ctime, mtime, crtime
			le.PutUint32(b[o:], now)
		}
		le.PutUint16(b[0x1a:], links)
		le.PutUint32(b[0x1c:], uint32(blocks*mkfsBlockSize/512))
		le.PutUint32(b[0x20:], inodeFlagExtents)
		copy(b[0x28:0x64], ib)
		le.PutUint16(b[0x80:], 32) // i_extra_isize
		sealInode(seed, ino, b)
	}
	inode(rootInode, 0o040755, mkfsBlockSize, 2, 1, extentRoot(p.root, 1))
	inode(journalIno, 0o100600, p.jblocks*mkfsBlockSize, 1, p.jblocks, journalIBlock(p))
	if _, err := dev.WriteAt(table, int64(p.it[0])*mkfsBlockSize); err != nil {
		return fmt.Errorf("write inode table 0: %w", err)
	}

	dir := make([]byte, mkfsBlockSize)
	dirent := func(off int, ino uint32, recLen uint16, name string) {
		le.PutUint32(dir[off:], ino)
		le.PutUint16(dir[off+4:], recLen)
		dir[off+6] = byte(len(name))
		dir[off+7] = 2 // directory
		copy(dir[off+8:], name)
	}
	dirent(0, rootInode, 12, ".")
	// metadata_csum's dirent tail: a fake entry holding the block checksum
	tail := mkfsBlockSize - 12
	dirent(12, rootInode, uint16(tail-12), "..")
	le.PutUint16(dir[tail+4:], 12)
	dir[tail+7] = 0xde
	var n [8]byte
	le.PutUint32(n[:], rootInode) // and generation 0
	le.PutUint32(dir[tail+8:], crc.CRC32c(crc.CRC32c(seed, n[:]), dir[:tail]))
	if _, err := dev.WriteAt(dir, int64(p.root)*mkfsBlockSize); err != nil {
		return fmt.Errorf("write root directory: %w", err)
	}

	// jbd2's superblock, big-endian; s_start 0 says there is nothing to
	// replay. The rest is zeroed, as mkfs.ext4 does unless lazy_journal_init.
	chunk := make([]byte, min(p.jblocks*mkfsBlockSize, 4<<20))
	be := binary.BigEndian
	be.PutUint32(chunk[0x00:], 0xc03b3998)
	be.PutUint32(chunk[0x04:], 4) // superblock v2
	be.PutUint32(chunk[0x0c:], mkfsBlockSize)
	be.PutUint32(chunk[0x10:], uint32(p.jblocks))
	be.PutUint32(chunk[0x14:], 1) // s_first
	be.PutUint32(chunk[0x18:], 1) // s_sequence
	copy(chunk[0x30:0x40], uuid[:])
	be.PutUint32(chunk[0x40:], 1) // s_nr_users
	for off := uint64(0); off < p.jblocks*mkfsBlockSize; off += uint64(len(chunk)) {
		if _, err := dev.WriteAt(chunk, int64(p.journal*mkfsBlockSize+off)); err != nil {
			return fmt.Errorf("write journal: %w", err)
		}
		if off == 0 {
			clear(chunk[:1024])
		}
	}
	return nil
}

// sealInode sets inode ino's metadata_csum checksum. go-diskfs verifies
// inode checksums even without metadata_csum, so they are always set.
func sealInode(seed, ino uint32, b []byte) {
	le := binary.LittleEndian
	le.PutUint16(b[0x7c:], 0)
	big := len(b) > 128 && le.Uint16(b[0x80:]) >= 4
	if big {
		le.PutUint16(b[0x82:], 0)
	}
	var n [8]byte
	le.PutUint32(n[:], ino)
	le.PutUint32(n[4:], le.Uint32(b[0x64:]))
	c := crc.CRC32c(crc.CRC32c(seed, n[:]), b)
	le.PutUint16(b[0x7c:], uint16(c))
	if big {
		le.PutUint16(b[0x82:], uint16(c>>16))
	}
}
