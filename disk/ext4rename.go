package disk

// This file holds rename on ext4, which go-diskfs v1.9.4 lacks: the
// directory entry moves, the inode stays. It runs in epochs, each ended by
// a Device.Sync, so that after a crash at any point the new name shows
// either what it showed before (nothing, or the file it replaced) or the
// renamed file, complete, and the old name the renamed file or nothing:
//
//	A  the intent record in the superblock: the inodes involved, where
//	   the new and the old entry are, the link counts before
//	B  (adding a name) the new record written where nothing reads it:
//	   into an empty record, with its inode still 0, or into the slack
//	   after a record
//	C  the switch, one aligned write of at most 4 bytes: the new record's
//	   inode (an empty record, or the replaced name's record, which keeps
//	   its length and type), or the length of the record whose slack it
//	   took
//	D  the old record unlinked, a moved directory's ".." and the link
//	   counts of both parents; the replaced inode freed (its blocks, its
//	   inode bit, the counts); then the intent cleared
//
// Put's replace (replaceExt4) marks its record: should the switch not have
// happened, the repair removes the source, Put's complete temporary file,
// so that a crash leaves the tree as before the Put, not with a stray
// .NAME.keygate-put (ext4put.go).
//
// Between C and D both names point at the file, its link count says one,
// and a replaced inode is unreferenced but not freed: e2fsck would report
// each. The next writable OpenFS finishes D from the intent record, as
// ext4's journal replay would (finishRename): whether C happened is read
// from the new entry's place. Before C nothing any reader sees changed,
// except the checksum tails of the blocks B wrote, which the repair
// recomputes (a torn write leaves the records well formed, the tail not).
//
// A name added to a directory with no room first grows it by an empty
// block (growDir, under ext4write.go's intent record), and one added to
// an htree directory first makes it linear (unindex, its own intent):
// each is a complete, consistent change that a crash may leave done with
// the rename not.

import (
	"encoding/binary"
	"fmt"
	"path"
)

// renameMagic marks a rename's intent record: "KGR1".
const renameMagic = 0x3152474b

// renameIntent is the record epoch A writes, at intentOff.
type renameIntent struct {
	ino, target       uint32 // the inode renamed; the one it replaces, or 0
	from, to          uint32 // the old and the new parent directory
	newBlk, oldBlk    uint64 // the blocks holding the new and the old record
	newOff, oldOff    uint32
	isDir, targetDir  bool
	dropSrc           bool   // Put's temporary file: removed if C did not happen
	fromLinks, toLink uint16 // the parents' link counts before
	usedDirs          uint32 // the used-directory count of target's group before
	dotdot            uint64 // a moved directory's first block, holding ".."
}

func (r *renameIntent) put(b []byte) {
	le := binary.LittleEndian
	clear(b)
	le.PutUint32(b, renameMagic)
	le.PutUint32(b[4:], r.ino)
	le.PutUint32(b[8:], r.target)
	le.PutUint32(b[12:], r.from)
	le.PutUint32(b[16:], r.to)
	le.PutUint64(b[20:], r.newBlk)
	le.PutUint32(b[28:], r.newOff)
	le.PutUint64(b[32:], r.oldBlk)
	le.PutUint32(b[40:], r.oldOff)
	if r.isDir {
		b[44] |= 1
	}
	if r.targetDir {
		b[44] |= 2
	}
	if r.dropSrc {
		b[44] |= 4
	}
	le.PutUint16(b[48:], r.fromLinks)
	le.PutUint16(b[50:], r.toLink)
	le.PutUint32(b[52:], r.usedDirs)
	le.PutUint64(b[56:], r.dotdot)
}

func getRenameIntent(b []byte) renameIntent {
	le := binary.LittleEndian
	return renameIntent{
		ino: le.Uint32(b[4:]), target: le.Uint32(b[8:]), from: le.Uint32(b[12:]), to: le.Uint32(b[16:]),
		newBlk: le.Uint64(b[20:]), newOff: le.Uint32(b[28:]), oldBlk: le.Uint64(b[32:]), oldOff: le.Uint32(b[40:]),
		isDir: b[44]&1 != 0, targetDir: b[44]&2 != 0, dropSrc: b[44]&4 != 0,
		fromLinks: le.Uint16(b[48:]), toLink: le.Uint16(b[50:]), usedDirs: le.Uint32(b[52:]), dotdot: le.Uint64(b[56:]),
	}
}

// renameExt4 moves the entry o to n (n replaced if it exists; the caller
// checked that the move is allowed: types match, a replaced directory is
// empty, n is not below o).
func (f *FS) renameExt4(o, n string, isDir bool) error {
	return f.renameExt4As(o, n, isDir, false)
}

// replaceExt4 moves Put's finished temporary file tmp over p; a crash
// before the switch removes tmp.
func (f *FS) replaceExt4(tmp, p string) error {
	return f.renameExt4As(tmp, p, false, true)
}

func (f *FS) renameExt4As(o, n string, isDir, dropSrc bool) error {
	if len(path.Base(n)) > 255 {
		return fmt.Errorf("rename to %s: a name has at most 255 bytes: %w", display(n), ErrInvalid)
	}
	if err := f.dev.Sync(); err != nil {
		return err
	}
	from, err := f.dirInode(path.Dir(o))
	if err != nil {
		return err
	}
	to, err := f.dirInode(path.Dir(n))
	if err != nil {
		return err
	}
	m, err := readExt4Meta(f.dev)
	if err != nil {
		return err
	}
	if err := f.renameSteps(m, o, n, from, to, isDir, dropSrc); err != nil {
		return fmt.Errorf("rename %s to %s: %w", display(o), display(n), err)
	}
	return f.reload()
}

func (f *FS) renameSteps(m *ext4Meta, o, n string, from, to uint32, isDir, dropSrc bool) error {
	le := binary.LittleEndian
	oname, nname := path.Base(o), path.Base(n)
	src, err := m.readDir(from)
	if err != nil {
		return err
	}
	_, old, err := src.find(oname)
	if err != nil {
		return err
	}
	r := renameIntent{ino: old.ino, from: from, to: to, isDir: isDir, dropSrc: dropSrc}
	if isDir && from != to {
		// ".." changes: an htree root's index checksum covers it
		d, err := m.readDir(r.ino)
		if err != nil {
			return err
		}
		if d.indexed() {
			if err := f.unindex(m, d); err != nil {
				return err
			}
		}
		r.dotdot = d.blocks[0].phys
	}
	dst, err := m.readDir(to)
	if err != nil {
		return err
	}
	var at slot
	bi, tr, err := dst.find(nname)
	replace := err == nil
	if replace {
		r.target = tr.ino
		at = slot{i: bi, off: tr.off}
		tin, err := m.readInode(r.target)
		if err != nil {
			return err
		}
		r.targetDir = le.Uint16(tin[0:])&0xf000 == 0x4000
		r.usedDirs = uint32(m.field(int((r.target-1)/m.ipg), 0x10, 0x30, 2))
	} else {
		if m, dst, at, err = f.placeName(m, to, nname); err != nil {
			return err
		}
	}
	// the source is read again: growing or unindexing may have changed it
	// (when it is the same directory, or the one moved)
	if src, err = m.readDir(from); err != nil {
		return err
	}
	si, old, err := src.find(oname)
	if err != nil {
		return err
	}
	if old.ino != r.ino {
		return fmt.Errorf("entry %q changed under the rename", oname)
	}
	r.oldBlk, r.oldOff = src.blocks[si].phys, uint32(old.off)
	r.newBlk, r.newOff = dst.blocks[at.i].phys, uint32(at.off)
	r.fromLinks = le.Uint16(src.inode[0x1a:])
	r.toLink = le.Uint16(dst.inode[0x1a:])

	// A: the intent
	r.put(m.sb[intentOff:0x3fc])
	if err := m.writeSuper(); err != nil {
		return err
	}
	if err := m.dev.Sync(); err != nil {
		return err
	}
	fail := func(err error) error {
		if rerr := f.recoverExt4(); rerr != nil {
			err = fmt.Errorf("%w (and finishing or undoing it failed: %v)", err, rerr)
		}
		return err
	}
	typ := byte(1)
	if isDir {
		typ = 2
	}
	if err := writeEntry(dst, at, r.ino, nname, typ, replace); err != nil {
		return fail(err)
	}
	// D
	if err := m.finishRename(r); err != nil {
		return fail(err)
	}
	if err := m.dev.Sync(); err != nil {
		return fail(err)
	}
	clear(m.sb[intentOff:0x3fc])
	if err := m.writeSuper(); err != nil {
		return err
	}
	return m.dev.Sync()
}

// recordAt finds the record at off of directory block blk, if that is
// where a record of the block's chain starts.
func (m *ext4Meta) recordAt(blk uint64, off uint32) (dirent, []byte, bool, error) {
	b := make([]byte, m.bs)
	if blk < m.firstData || blk >= m.blocksCount {
		return dirent{}, nil, false, fmt.Errorf("rename intent names block %d, outside the filesystem", blk)
	}
	if _, err := m.dev.ReadAt(b, int64(blk)*m.bs); err != nil {
		return dirent{}, nil, false, fmt.Errorf("read directory block %d: %w", blk, err)
	}
	rs, err := records(b)
	if err != nil {
		return dirent{}, nil, false, fmt.Errorf("directory block %d: %w", blk, err)
	}
	for _, r := range rs {
		if r.off == int(off) {
			return r, b, true, nil
		}
	}
	return dirent{}, b, false, nil
}

// finishRename completes epoch D from the intent record if epoch C
// happened, and otherwise only repairs the checksum tails epoch B may
// have left stale. It may run any number of times: each step checks what
// is still to do, and every count is set to what it must end as, from
// the counts before.
func (m *ext4Meta) finishRename(r renameIntent) error {
	le := binary.LittleEndian
	for _, x := range []struct {
		ino uint32
		blk uint64
	}{{r.to, r.newBlk}, {r.from, r.oldBlk}, {r.ino, r.dotdot}} {
		if err := m.reseal(x.ino, x.blk); err != nil {
			return err
		}
	}
	nr, _, ok, err := m.recordAt(r.newBlk, r.newOff)
	if err != nil {
		return err
	}
	if !ok || nr.ino != r.ino {
		// the switch did not happen: the rename did not
		if !r.dropSrc {
			return nil
		}
		if err := m.dropEntry(r.from, r.oldBlk, r.oldOff, r.ino); err != nil {
			return err
		}
		// complete and durable before the record: its tree can be read
		return m.freeInode(r.ino, false, 0)
	}
	// the old record, unless already unlinked
	if or, b, ok, err := m.recordAt(r.oldBlk, r.oldOff); err != nil {
		return err
	} else if ok && or.ino == r.ino && !(r.oldBlk == r.newBlk && r.oldOff == r.newOff) {
		unlink(b, or)
		in, err := m.readInode(r.from)
		if err != nil {
			return err
		}
		m.sealDirBlock(r.from, in, b)
		if _, err := m.dev.WriteAt(b, int64(r.oldBlk)*m.bs); err != nil {
			return fmt.Errorf("write directory block %d: %w", r.oldBlk, err)
		}
	}
	if r.isDir && r.from != r.to && r.dotdot != 0 {
		in, err := m.readInode(r.ino)
		if err != nil {
			return err
		}
		b := make([]byte, m.bs)
		if _, err := m.dev.ReadAt(b, int64(r.dotdot)*m.bs); err != nil {
			return fmt.Errorf("read directory block %d: %w", r.dotdot, err)
		}
		if rs, err := records(b); err != nil || len(rs) < 2 || rs[1].name != ".." {
			return fmt.Errorf("directory inode %d: no \"..\" where it belongs", r.ino)
		}
		le.PutUint32(b[12:], r.to)
		m.sealDirBlock(r.ino, in, b)
		if _, err := m.dev.WriteAt(b, int64(r.dotdot)*m.bs); err != nil {
			return fmt.Errorf("write directory block %d: %w", r.dotdot, err)
		}
	}
	// link counts: a moved directory's ".." leaves from for to; a
	// replaced directory's ".." leaves to
	links := map[uint32]int{r.from: int(r.fromLinks), r.to: int(r.toLink)}
	if r.isDir {
		links[r.from]--
		links[r.to]++
	}
	if r.targetDir {
		links[r.to]--
	}
	for ino, want := range links {
		in, err := m.readInode(ino)
		if err != nil {
			return err
		}
		if int(le.Uint16(in[0x1a:])) != want && want >= 2 {
			le.PutUint16(in[0x1a:], uint16(want))
			if err := m.writeInode(ino, in); err != nil {
				return err
			}
		}
	}
	if r.target != 0 {
		if err := m.freeInode(r.target, r.targetDir, r.usedDirs); err != nil {
			return err
		}
	}
	return nil
}

// freeInode frees an inode no entry references any more: its blocks, its
// inode bitmap bit, its group's used-directory count (set from the count
// before, so that a repeat does not count it twice), then the inode
// record itself, last, so that a repeat still finds its blocks.
func (m *ext4Meta) freeInode(ino uint32, isDir bool, usedDirs uint32) error {
	in, err := m.readInode(ino)
	if err != nil {
		return err
	}
	if allZero(in) {
		return nil
	}
	leaves, index, err := m.extents(in)
	if err != nil {
		return fmt.Errorf("inode %d: %w", ino, err)
	}
	blocks := append([]extent(nil), leaves...)
	for _, b := range index {
		blocks = append(blocks, extent{phys: b, count: 1})
	}
	if err := m.freeBlocks(blocks); err != nil {
		return err
	}
	g, bit := int((ino-1)/m.ipg), (ino-1)%m.ipg
	ib := make([]byte, m.ipg/8)
	if _, err := m.dev.ReadAt(ib, m.inodeBitmap(g)); err != nil {
		return fmt.Errorf("read inode bitmap %d: %w", g, err)
	}
	ib[bit/8] &^= 1 << (bit % 8)
	if _, err := m.dev.WriteAt(ib, m.inodeBitmap(g)); err != nil {
		return fmt.Errorf("write inode bitmap %d: %w", g, err)
	}
	if isDir && usedDirs > 0 {
		m.setField16(g, 0x10, 0x30, usedDirs-1)
	}
	if err := m.recount(); err != nil {
		return err
	}
	clear(in) // e2fsck expects a freed inode all zeros (writeInode)
	return m.writeInode(ino, in)
}

// recoverRename runs finishRename from a rename intent record found at
// open, then clears the record.
func (f *FS) recoverRename(m *ext4Meta) error {
	if err := m.finishRename(getRenameIntent(m.sb[intentOff:0x3fc])); err != nil {
		return fmt.Errorf("finish an interrupted rename: %w", err)
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

// recoverUnindex finishes an interrupted unindex (ext4dir.go).
func (f *FS) recoverUnindex(m *ext4Meta) error {
	if err := m.finishUnindex(); err != nil {
		return fmt.Errorf("finish making a directory linear: %w", err)
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

// placeName finds room for a record of name in directory ino: an htree
// directory is made linear first, and a full one grows by a block. It
// returns the metadata and the directory as they are afterwards.
func (f *FS) placeName(m *ext4Meta, ino uint32, name string) (*ext4Meta, *dir, slot, error) {
	d, err := m.readDir(ino)
	if err != nil {
		return nil, nil, slot{}, err
	}
	if d.indexed() {
		if err := f.unindex(m, d); err != nil {
			return nil, nil, slot{}, err
		}
		if d, err = m.readDir(ino); err != nil {
			return nil, nil, slot{}, err
		}
	}
	need := recSize(len(name))
	s, ok, err := d.room(need)
	if err != nil || ok {
		return m, d, s, err
	}
	if err := f.growDir(m, ino); err != nil {
		return nil, nil, slot{}, err
	}
	if m, err = readExt4Meta(f.dev); err != nil {
		return nil, nil, slot{}, err
	}
	if d, err = m.readDir(ino); err != nil {
		return nil, nil, slot{}, err
	}
	if s, ok, err = d.room(need); err != nil {
		return nil, nil, slot{}, err
	} else if !ok {
		return nil, nil, slot{}, fmt.Errorf("directory inode %d has no room after growing", ino)
	}
	return m, d, s, nil
}

// writeEntry runs epochs B and C: the record of name for inode ino at
// slot at of d, each step made durable. With replace, at is an existing
// record, which only changes its inode.
func writeEntry(d *dir, at slot, ino uint32, name string, typ byte, replace bool) error {
	le, dev := binary.LittleEndian, d.m.dev
	b := d.blocks[at.i].b
	switch {
	case replace:
		// C: the replaced name's record points at the new inode
		le.PutUint32(b[at.off:], ino)
	case at.reuse:
		// B: the name into the empty record, still inode 0; C: its inode
		putRecord(b, at.off, 0, int(le.Uint16(b[at.off+4:])), name, typ)
		if err := d.write(at.i); err != nil {
			return err
		}
		if err := dev.Sync(); err != nil {
			return err
		}
		le.PutUint32(b[at.off:], ino)
	default:
		// B: the record into the slack; C: the record before it shortened
		putRecord(b, at.off, ino, at.split.off+at.split.recLen-at.off, name, typ)
		if err := d.write(at.i); err != nil {
			return err
		}
		if err := dev.Sync(); err != nil {
			return err
		}
		le.PutUint16(b[at.split.off+4:], uint16(at.off-at.split.off))
	}
	if err := d.write(at.i); err != nil {
		return err
	}
	return dev.Sync()
}
