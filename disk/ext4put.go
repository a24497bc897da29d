package disk

// This file makes a crash while Put writes its temporary file
// (.NAME.keygate-put) leave nothing behind: no name, no inode, no block.
// go-diskfs v1.9.4 writes the content, and with it the block bitmaps,
// group descriptors, superblock, extent tree and inode, in an unordered
// batch: a cut between a bitmap and the inode that references its new
// blocks leaves blocks marked used that no file references, which e2fsck
// -fn reports.
//
// So Put keeps an intent record in the superblock (putMagic) from the
// temporary file's creation until the rename over NAME replaces it:
//
//	the temporary file's inode, its parent and where its record is;
//	every run of blocks go-diskfs marks used meanwhile
//
// putWatch sits between go-diskfs and the Device and sees each block
// bitmap go-diskfs writes: before the write goes through, the blocks it
// newly marks used join the record, which is made durable first. It also
// copies the record into every superblock go-diskfs writes, which would
// otherwise zero it. The next writable open (recoverPut) then removes the
// temporary file's record from its directory, frees every block listed
// (the file was created empty, so these are all it can own, referenced or
// not: its extent tree, perhaps half written, is never read) and the
// inode, and recounts. A record left before another writer had the
// volume (a kernel's mount over NBD, e2fsck: see stamp) is dropped
// instead, as those blocks may be another file's by then.
//
// The chain of records for one Put on ext4, each replacing the last with
// one write of the superblock's second 512-byte half: the create's
// (ext4create.go, marked as Put's, so that a live name is undone too),
// this one, and the rename's (ext4rename.go, marked so that a rename
// whose switch did not happen removes its source). A crash anywhere
// before the switch leaves the tree as before, with nothing for e2fsck
// to report. Left out: a record that would list more than putRunsMax
// runs (go-diskfs allocating from that many separate free areas, on a
// fragmented volume) is dropped, and the Put goes on as before this
// file, a crash then possibly leaking blocks; and growing (or making
// linear) NAME's directory for the rename runs under its own record, so
// a crash there leaves the complete temporary file behind.

import (
	"encoding/binary"
	"fmt"

	"github.com/diskfs/go-diskfs/backend"
	"github.com/diskfs/go-diskfs/filesystem/ext4/crc"
)

// putMagic marks Put's intent record: "KGP1". Layout after the magic:
// inode 4, parent 8, record block 12 (8 bytes), record offset 20, run
// count 24, stamp 28 (10 bytes), runs from 40 (block 8 bytes, count 4).
const putMagic = 0x3150474b

const putRunsMax = (0x3fc - intentOff - 40) / 12

// stamp is what a kernel's mount (mount time and count) or e2fsck (last
// check) changes in the superblock and keygate never does. A record
// whose stamp is not the superblock's was left by a crash before another
// writer had the volume (attached over NBD, or repaired): the blocks it
// lists may be another file's by now, so it is not acted on.
func (m *ext4Meta) stamp() []byte {
	return append(append(m.sb[0x2c:0x30:0x30], m.sb[0x34:0x36]...), m.sb[0x40:0x44]...)
}

// foreign says whether a record with stamp st predates another writer's
// use of the volume.
func (m *ext4Meta) foreign(st []byte) bool { return string(st[:10]) != string(m.stamp()) }

// putLog is the record of the Put in progress, while on.
type putLog struct {
	on      bool
	m       *ext4Meta
	rec     []byte        // the record, as it goes into the superblock
	runs    []extent      // the blocks go-diskfs marked used so far
	bitmaps map[int64]int // block bitmap offset to group
}

// startPut begins the record of Put's temporary file ino, whose record
// is at off of block blk of directory parent. It is made durable by the
// caller's next superblock write and sync (the end of createExt4).
func (f *FS) startPut(m *ext4Meta, ino, parent uint32, blk uint64, off uint32) {
	l := &f.plog
	*l = putLog{on: true, m: m, rec: make([]byte, 0x3fc-intentOff), bitmaps: map[int64]int{}}
	for g := 0; g < m.groups; g++ {
		l.bitmaps[m.blockBitmap(g)] = g
	}
	le := binary.LittleEndian
	le.PutUint32(l.rec, putMagic)
	le.PutUint32(l.rec[4:], ino)
	le.PutUint32(l.rec[8:], parent)
	le.PutUint64(l.rec[12:], blk)
	le.PutUint32(l.rec[20:], off)
	copy(l.rec[28:38], m.stamp())
	copy(m.sb[intentOff:0x3fc], l.rec)
}

// stopPut ends the watch; the record stays in the superblock until the
// rename's replaces it (or a repair clears it).
func (f *FS) stopPut() { f.plog = putLog{} }

// putWatch is the backend go-diskfs gets for ext4 (see the top).
type putWatch struct {
	backend.Storage
	log *putLog
}

type putWatchFile struct {
	backend.WritableFile
	log *putLog
}

func (w *putWatch) Writable() (backend.WritableFile, error) {
	wf, err := w.Storage.Writable()
	if err != nil {
		return nil, err
	}
	return &putWatchFile{WritableFile: wf, log: w.log}, nil
}

func (w *putWatchFile) WriteAt(p []byte, off int64) (int, error) {
	l := w.log
	if !l.on {
		return w.WritableFile.WriteAt(p, off)
	}
	if off == 1024 && len(p) == 1024 {
		p = l.patchSuper(p)
	} else if g, ok := l.bitmaps[off]; ok && int64(len(p)) == l.m.bs {
		if err := l.logAlloc(w.WritableFile, g, p); err != nil {
			return 0, err
		}
	}
	return w.WritableFile.WriteAt(p, off)
}

// patchSuper returns a copy of superblock p carrying the record.
func (l *putLog) patchSuper(p []byte) []byte {
	q := append([]byte(nil), p...)
	copy(q[intentOff:0x3fc], l.rec)
	if l.m.metaCsum {
		binary.LittleEndian.PutUint32(q[0x3fc:], crc.CRC32c(0xffffffff, q[:0x3fc]))
	}
	return q
}

// setRuns puts runs in the record, or, when they are too many to list
// (a fragmented volume), clears it: the Put goes on unrecorded, as
// go-diskfs alone would.
func (l *putLog) setRuns(runs []extent) {
	le := binary.LittleEndian
	if len(runs) > putRunsMax {
		clear(l.rec)
		return
	}
	l.runs = runs
	le.PutUint32(l.rec[24:], uint32(len(runs)))
	for i, r := range runs {
		le.PutUint64(l.rec[40+12*i:], r.phys)
		le.PutUint32(l.rec[48+12*i:], r.count)
	}
}

// logAlloc adds the blocks that bitmap p of group g marks used, and the
// bitmap on disk does not, to the record, and makes it durable.
func (l *putLog) logAlloc(dev backend.WritableFile, g int, p []byte) error {
	m := l.m
	old := make([]byte, m.bs)
	if _, err := dev.ReadAt(old, m.blockBitmap(g)); err != nil {
		return fmt.Errorf("read block bitmap %d: %w", g, err)
	}
	start := m.firstData + uint64(g)*uint64(m.bpg)
	n := min(uint64(m.bpg), m.blocksCount-start)
	var added []extent
	for i := uint64(0); i < n; i++ {
		if p[i/8]&^old[i/8] == 0 {
			i |= 7
			continue
		}
		if p[i/8]&(1<<(i%8)) != 0 && old[i/8]&(1<<(i%8)) == 0 {
			added = append(added, extent{phys: start + i, count: 1})
		}
	}
	if len(added) == 0 {
		return nil
	}
	l.setRuns(mergeRuns(append(l.runs, added...)))
	sb := make([]byte, 1024)
	if _, err := dev.ReadAt(sb, 1024); err != nil {
		return fmt.Errorf("read superblock: %w", err)
	}
	if _, err := dev.WriteAt(l.patchSuper(sb), 1024); err != nil {
		return fmt.Errorf("write superblock: %w", err)
	}
	if allZero(l.rec) {
		l.on = false
	}
	// the record before the bitmap that needs it
	return m.dev.Sync()
}

// recoverPut removes the temporary file of a Put that a crash
// interrupted: its record, every block listed, its inode.
func (f *FS) recoverPut(m *ext4Meta) error {
	if err := m.dropPutTemp(); err != nil {
		return fmt.Errorf("remove an interrupted put's temporary file: %w", err)
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

// dropPutTemp is recoverPut's work, which may run any number of times.
func (m *ext4Meta) dropPutTemp() error {
	le := binary.LittleEndian
	b := m.sb[intentOff:0x3fc]
	ino, parent, blk, off, n := le.Uint32(b[4:]), le.Uint32(b[8:]), le.Uint64(b[12:]), le.Uint32(b[20:]), int(le.Uint32(b[24:]))
	if ino == 0 || ino > m.ipg*uint32(m.groups) || n > putRunsMax {
		return fmt.Errorf("put intent names inode %d and %d block runs: not a record keygate writes", ino, n)
	}
	if m.foreign(b[28:]) {
		return nil // the temporary file stays, as another writer left it
	}
	runs := make([]extent, n)
	for i := range runs {
		runs[i] = extent{phys: le.Uint64(b[40+12*i:]), count: le.Uint32(b[48+12*i:])}
	}
	if err := m.dropEntry(parent, blk, off, ino); err != nil {
		return err
	}
	if err := m.freeBlocks(runs); err != nil {
		return err
	}
	return m.dropInode(ino)
}

// dropEntry unlinks the record at off of block blk of directory parent
// if it still names inode ino, after mending the block's checksum tail.
func (m *ext4Meta) dropEntry(parent uint32, blk uint64, off, ino uint32) error {
	if err := m.reseal(parent, blk); err != nil {
		return err
	}
	r, b, ok, err := m.recordAt(blk, off)
	if err != nil || !ok || r.ino != ino {
		return err
	}
	unlink(b, r)
	in, err := m.readInode(parent)
	if err != nil {
		return err
	}
	m.sealDirBlock(parent, in, b)
	if _, err := m.dev.WriteAt(b, int64(blk)*m.bs); err != nil {
		return fmt.Errorf("write directory block %d: %w", blk, err)
	}
	return nil
}

// dropInode frees the inode of a file that owns no block any more.
func (m *ext4Meta) dropInode(ino uint32) error {
	if err := m.writeInode(ino, make([]byte, m.inodeSize)); err != nil {
		return err
	}
	return m.markInode(ino, false)
}
