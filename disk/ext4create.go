package disk

// This file creates empty ext4 files in keygate's own code, ordered as a
// rename is (ext4rename.go), because go-diskfs v1.9.4 writes a new file's
// inode bitmap, inode and parent directory in one unordered batch and
// rewrites the whole parent directory to add the name: a crash that tears
// that rewrite (a 4 KiB directory block over 512-byte sectors) leaves the
// directory unreadable, every name in it gone. Here:
//
//	A  the intent record: the inode, the parent, where the record goes
//	B  the inode record written and marked used, with the counts
//	C  the name: written where nothing reads it, then switched live by
//	   one aligned write (writeEntry)
//
// The next writable open keeps the inode if the name is live, and frees
// it otherwise (recoverCreate); Put's temporary file it frees either way
// (ext4put.go).

import (
	"encoding/binary"
	"fmt"
	"path"
	"time"
)

// createMagic marks a create's intent record: "KGC1".
const createMagic = 0x3143474b

// createExt4 creates p as an empty regular file. It reports false, having
// changed nothing, when no initialised inode is free (go-diskfs then
// creates it, initialising a group). With temp, p is Put's temporary
// file: a crash undoes the create even once the name is live, and the
// create's record gives way to Put's (ext4put.go), which watches what
// go-diskfs then writes until the rename over the real name.
func (f *FS) createExt4(p string, temp bool) (bool, error) {
	if len(path.Base(p)) > 255 {
		return false, fmt.Errorf("create %s: a name has at most 255 bytes: %w", display(p), ErrInvalid)
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
	ino, err := m.freeInode0(parent)
	if err != nil || ino == 0 {
		return false, err
	}
	m, d, at, err := f.placeName(m, parent, path.Base(p))
	if err != nil {
		return false, fmt.Errorf("create %s: %w", display(p), err)
	}
	if err := f.createSteps(m, d, at, ino, path.Base(p), temp); err != nil {
		f.stopPut()
		if rerr := f.recoverExt4(); rerr != nil {
			err = fmt.Errorf("%w (and undoing it failed: %v)", err, rerr)
		}
		return false, fmt.Errorf("create %s: %w", display(p), err)
	}
	return true, f.reload()
}

func (f *FS) createSteps(m *ext4Meta, d *dir, at slot, ino uint32, name string, temp bool) error {
	le := binary.LittleEndian
	b := m.sb[intentOff:0x3fc]
	clear(b)
	le.PutUint32(b, createMagic)
	le.PutUint32(b[4:], ino)
	le.PutUint32(b[8:], d.ino)
	le.PutUint64(b[12:], d.blocks[at.i].phys)
	le.PutUint32(b[20:], uint32(at.off))
	if temp {
		b[24] = 1
	}
	if err := m.writeSuper(); err != nil {
		return err
	}
	if err := m.dev.Sync(); err != nil {
		return err
	}
	// B
	in := m.freshInode(0x81a4, 1) // regular, 0644
	if err := m.writeInode(ino, in); err != nil {
		return err
	}
	if err := m.markInode(ino, true); err != nil {
		return err
	}
	if err := m.recount(); err != nil {
		return err
	}
	if err := m.dev.Sync(); err != nil {
		return err
	}
	// C
	if err := writeEntry(d, at, ino, name, 1, false); err != nil {
		return err
	}
	clear(b)
	if temp {
		f.startPut(m, ino, d.ino, d.blocks[at.i].phys, uint32(at.off))
	}
	if err := m.writeSuper(); err != nil {
		return err
	}
	return m.dev.Sync()
}

// freshInode is a new inode of mode with links names and an empty
// extent tree, its times now.
func (m *ext4Meta) freshInode(mode, links uint16) []byte {
	le := binary.LittleEndian
	in := make([]byte, m.inodeSize)
	le.PutUint16(in[0x00:], mode)
	now := uint32(time.Now().Unix())
	for _, off := range []int{0x08, 0x0c, 0x10} {
		le.PutUint32(in[off:], now)
	}
	le.PutUint16(in[0x1a:], links)
	le.PutUint32(in[0x20:], inodeFlagExtents)
	putHeader(in[0x28:], 0, 4, 0)
	if m.inodeSize > 128 {
		le.PutUint16(in[0x80:], 32)
		le.PutUint32(in[0x90:], now) // creation time
	}
	return in
}

// freeInode0 picks a free inode in a group whose inode table is
// initialised, from the parent's group on, or returns 0. Past the part of
// the table in use (bg_itable_unused) it moves that mark in memory, for
// the next recount to write.
func (m *ext4Meta) freeInode0(parent uint32) (uint32, error) {
	le := binary.LittleEndian
	first := le.Uint32(m.sb[0x54:])
	if le.Uint32(m.sb[0x4c:]) == 0 { // revision 0: fixed first inode
		first = 11
	}
	g0 := int((parent - 1) / m.ipg)
	ib := make([]byte, m.ipg/8)
	for k := 0; k < m.groups; k++ {
		g := (g0 + k) % m.groups
		if m.flags(g)&bgInodeUninit != 0 {
			continue
		}
		used := m.ipg
		if m.gdtC || m.metaCsum {
			used -= uint32(m.field(g, 0x1c, 0x32, 2))
		}
		if _, err := m.dev.ReadAt(ib, m.inodeBitmap(g)); err != nil {
			return 0, fmt.Errorf("read inode bitmap %d: %w", g, err)
		}
		for i := uint32(0); i < m.ipg; i++ {
			ino := uint32(g)*m.ipg + i + 1
			if ino >= first && ib[i/8]&(1<<(i%8)) == 0 {
				if i >= used {
					// past the table's initialised part: it grows to take
					// it (its records there are never read before written)
					m.setField16(g, 0x1c, 0x32, m.ipg-(i+1))
				}
				return ino, nil
			}
		}
	}
	return 0, nil
}

// markInode sets or clears inode ino's bit in its group's inode bitmap.
func (m *ext4Meta) markInode(ino uint32, used bool) error {
	g, bit := int((ino-1)/m.ipg), (ino-1)%m.ipg
	ib := make([]byte, m.ipg/8)
	if _, err := m.dev.ReadAt(ib, m.inodeBitmap(g)); err != nil {
		return fmt.Errorf("read inode bitmap %d: %w", g, err)
	}
	if used {
		ib[bit/8] |= 1 << (bit % 8)
	} else {
		ib[bit/8] &^= 1 << (bit % 8)
	}
	if _, err := m.dev.WriteAt(ib, m.inodeBitmap(g)); err != nil {
		return fmt.Errorf("write inode bitmap %d: %w", g, err)
	}
	return nil
}

// recoverCreate keeps the inode of an interrupted create if its name is
// live, and frees it otherwise; Put's temporary file goes either way (its
// name unlinked first). Then the counts follow the bitmaps.
func (f *FS) recoverCreate(m *ext4Meta) error {
	le := binary.LittleEndian
	b := m.sb[intentOff:0x3fc]
	ino, parent, blk, off := le.Uint32(b[4:]), le.Uint32(b[8:]), le.Uint64(b[12:]), le.Uint32(b[20:])
	if ino == 0 || ino > m.ipg*uint32(m.groups) {
		return fmt.Errorf("create intent names inode %d, outside the filesystem", ino)
	}
	if b[24] == 1 {
		if err := m.dropEntry(parent, blk, off, ino); err != nil {
			return err
		}
	} else if err := m.reseal(parent, blk); err != nil {
		return err
	}
	r, _, ok, err := m.recordAt(blk, off)
	if err != nil {
		return err
	}
	if !ok || r.ino != ino {
		if err := m.dropInode(ino); err != nil {
			return err
		}
	}
	clear(b)
	if err := m.recount(); err != nil {
		return err
	}
	if err := f.dev.Sync(); err != nil {
		return err
	}
	return f.reload()
}
