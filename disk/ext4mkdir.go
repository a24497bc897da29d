package disk

// This file creates ext4 directories in keygate's own code, ordered as a
// create is (ext4create.go), because go-diskfs v1.9.4 writes a new
// directory's bitmaps, inode, first block, parent entry, the parent's link
// count and the group's directory count in one unordered batch: a crash
// inside it leaves counts e2fsck reports, an entry naming an inode not
// yet written, or (on 512-byte sectors) a torn parent block. Here:
//
//	A  the intent record: the inode, the parent, where the record goes,
//	   the directory's block, the parent's link count and the group's
//	   directory count before
//	B  the directory's block ("." and ".."), its inode, both marked used,
//	   the group's directory count and the free counts
//	C  the name: written where nothing reads it, then switched live by
//	   one aligned write (writeEntry)
//	D  the parent's link count; then the intent cleared
//
// The next writable open (recoverMkdir) finishes D if the name is live,
// and otherwise frees the block and the inode and puts the counts back.

import (
	"encoding/binary"
	"fmt"
	"path"
)

// mkdirMagic marks a mkdir's intent record: "KGD1".
const mkdirMagic = 0x3144474b

type mkdirIntent struct {
	ino, parent uint32
	entBlk      uint64 // where the parent's record of the name goes
	entOff      uint32
	blk         uint64 // the directory's one block
	links       uint16 // the parent's link count before
	usedDirs    uint32 // the used-directory count of ino's group before
	stamp       []byte // the superblock's stamp (ext4put.go) at the start
}

func (r *mkdirIntent) put(b []byte) {
	le := binary.LittleEndian
	clear(b)
	le.PutUint32(b, mkdirMagic)
	le.PutUint32(b[4:], r.ino)
	le.PutUint32(b[8:], r.parent)
	le.PutUint64(b[12:], r.entBlk)
	le.PutUint32(b[20:], r.entOff)
	le.PutUint64(b[24:], r.blk)
	le.PutUint16(b[32:], r.links)
	le.PutUint32(b[36:], r.usedDirs)
	copy(b[40:50], r.stamp)
}

func getMkdirIntent(b []byte) mkdirIntent {
	le := binary.LittleEndian
	return mkdirIntent{ino: le.Uint32(b[4:]), parent: le.Uint32(b[8:]), entBlk: le.Uint64(b[12:]),
		entOff: le.Uint32(b[20:]), blk: le.Uint64(b[24:]), links: le.Uint16(b[32:]), usedDirs: le.Uint32(b[36:]),
		stamp: b[40:50]}
}

// mkdirAllExt4 creates p and its missing parents, each in ordered steps.
// It reports false when go-diskfs must make the rest: no initialised
// inode or block is free (go-diskfs then initialises a group).
func (f *FS) mkdirAllExt4(p string) (bool, error) {
	var missing []string
	for q := p; q != "."; q = path.Dir(q) {
		if _, err := f.stat(q); err == nil {
			break
		}
		missing = append(missing, q)
	}
	for i := len(missing) - 1; i >= 0; i-- {
		if ok, err := f.mkdirExt4(missing[i]); err != nil || !ok {
			return false, err
		}
	}
	return true, nil
}

// mkdirExt4 creates the empty directory p, whose parent exists.
func (f *FS) mkdirExt4(p string) (bool, error) {
	if len(path.Base(p)) > 255 {
		return false, fmt.Errorf("mkdir %s: a name has at most 255 bytes: %w", display(p), ErrInvalid)
	}
	if err := f.dev.Sync(); err != nil {
		return false, err
	}
	parent, err := f.dirInode(path.Dir(p))
	if err != nil {
		return false, err
	}
	m, err := readExt4Meta(f.dev)
	if err != nil {
		return false, err
	}
	// the name's place first: growing the parent re-reads m
	m, d, at, err := f.placeName(m, parent, path.Base(p))
	if err != nil {
		return false, fmt.Errorf("mkdir %s: %w", display(p), err)
	}
	ino, err := m.freeInode0(parent)
	if err != nil || ino == 0 {
		return false, err
	}
	bm := &bitmaps{m: m, maps: map[int][]byte{}, dirty: map[int]bool{}}
	e, err := bm.alloc(m.firstData+uint64((ino-1)/m.ipg)*uint64(m.bpg), 1)
	if err == errFallback {
		return false, nil // nothing written: the bitmaps are only cached
	} else if err != nil {
		return false, err
	}
	g := int((ino - 1) / m.ipg)
	r := mkdirIntent{ino: ino, parent: parent, entBlk: d.blocks[at.i].phys, entOff: uint32(at.off), blk: e.phys,
		links: binary.LittleEndian.Uint16(d.inode[0x1a:]), usedDirs: uint32(m.field(g, 0x10, 0x30, 2)), stamp: m.stamp()}
	if err := f.mkdirSteps(m, d, at, bm, r, path.Base(p)); err != nil {
		if rerr := f.recoverExt4(); rerr != nil {
			err = fmt.Errorf("%w (and undoing it failed: %v)", err, rerr)
		}
		return false, fmt.Errorf("mkdir %s: %w", display(p), err)
	}
	return true, f.reload()
}

func (f *FS) mkdirSteps(m *ext4Meta, d *dir, at slot, bm *bitmaps, r mkdirIntent, name string) error {
	le := binary.LittleEndian
	// A
	r.put(m.sb[intentOff:0x3fc])
	if err := m.writeSuper(); err != nil {
		return err
	}
	if err := m.dev.Sync(); err != nil {
		return err
	}
	// B
	in := m.freshInode(0x41ed, 2) // directory, 0755
	le.PutUint32(in[0x04:], uint32(m.bs))
	le.PutUint32(in[0x1c:], uint32(m.bs/512))
	putHeader(in[0x28:], 1, 4, 0)
	putLeaf(in[0x28+12:], extent{phys: r.blk, count: 1})
	b := make([]byte, m.bs)
	n := len(b)
	if m.metaCsum {
		n -= direntTail
		putRecord(b, n, 0, direntTail, "", 0xde)
	}
	putRecord(b, 0, r.ino, 12, ".", 2)
	putRecord(b, 12, r.parent, n-12, "..", 2)
	m.sealDirBlock(r.ino, in, b)
	if _, err := m.dev.WriteAt(b, int64(r.blk)*m.bs); err != nil {
		return fmt.Errorf("write directory block %d: %w", r.blk, err)
	}
	if err := m.writeInode(r.ino, in); err != nil {
		return err
	}
	if err := m.markInode(r.ino, true); err != nil {
		return err
	}
	if err := bm.write(); err != nil {
		return err
	}
	m.setField16(int((r.ino-1)/m.ipg), 0x10, 0x30, r.usedDirs+1)
	if err := m.recount(); err != nil {
		return err
	}
	if err := m.dev.Sync(); err != nil {
		return err
	}
	// C
	if err := writeEntry(d, at, r.ino, name, 2, false); err != nil {
		return err
	}
	// D
	if err := m.finishMkdir(r, true); err != nil {
		return err
	}
	if err := m.dev.Sync(); err != nil {
		return err
	}
	clear(m.sb[intentOff:0x3fc])
	if err := m.writeSuper(); err != nil {
		return err
	}
	return m.dev.Sync()
}

// finishMkdir sets what must follow from whether the name is live: the
// parent's link count and the group's directory count from the counts
// before, and, with the name not live, the block and inode freed. It may
// run any number of times.
func (m *ext4Meta) finishMkdir(r mkdirIntent, live bool) error {
	le := binary.LittleEndian
	links, dirs := r.links, r.usedDirs
	if live {
		dirs++
		if links >= 2 && links < 65000 { // else dir_nlink's 1 stays
			links++
		}
	} else {
		if err := m.freeBlocks([]extent{{phys: r.blk, count: 1}}); err != nil {
			return err
		}
		if err := m.dropInode(r.ino); err != nil {
			return err
		}
	}
	pin, err := m.readInode(r.parent)
	if err != nil {
		return err
	}
	if le.Uint16(pin[0x1a:]) != links {
		le.PutUint16(pin[0x1a:], links)
		if err := m.writeInode(r.parent, pin); err != nil {
			return err
		}
	}
	m.setField16(int((r.ino-1)/m.ipg), 0x10, 0x30, dirs)
	return m.recount()
}

// recoverMkdir finishes or undoes a mkdir a crash interrupted.
func (f *FS) recoverMkdir(m *ext4Meta) error {
	r := getMkdirIntent(m.sb[intentOff:0x3fc])
	if r.ino == 0 || r.ino > m.ipg*uint32(m.groups) || r.blk < m.firstData || r.blk >= m.blocksCount {
		return fmt.Errorf("mkdir intent names inode %d and block %d, outside the filesystem", r.ino, r.blk)
	}
	// after another writer (ext4put.go's stamp) the record is only dropped
	if !m.foreign(r.stamp) {
		if err := m.reseal(r.parent, r.entBlk); err != nil {
			return err
		}
		rec, _, ok, err := m.recordAt(r.entBlk, r.entOff)
		if err != nil {
			return err
		}
		if err := m.finishMkdir(r, ok && rec.ino == r.ino); err != nil {
			return fmt.Errorf("finish an interrupted mkdir: %w", err)
		}
	}
	clear(m.sb[intentOff:0x3fc])
	if err := m.recount(); err != nil {
		return err
	}
	if err := f.dev.Sync(); err != nil {
		return err
	}
	return f.reload()
}
