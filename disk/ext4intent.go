package disk

// This file holds the intent record of an in-place ext4 flush
// (ext4write.go) and the repair that the next writable OpenFS makes from
// it after a crash.

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/diskfs/go-diskfs/filesystem/ext4/crc"
)

func (m *ext4Meta) writeSuper() error {
	if m.metaCsum {
		binary.LittleEndian.PutUint32(m.sb[0x3fc:], crc.CRC32c(0xffffffff, m.sb[:0x3fc]))
	}
	if _, err := m.dev.WriteAt(m.sb, 1024); err != nil {
		return fmt.Errorf("write superblock: %w", err)
	}
	return nil
}

// setIntent records (or, with no runs, clears) the block runs whose owner
// the flush of inode ino changes. It is written by the next writeSuper.
func (m *ext4Meta) setIntent(ino uint32, runs []extent) {
	b, le := m.sb[intentOff:0x3fc], binary.LittleEndian
	clear(b)
	if len(runs) == 0 {
		return
	}
	le.PutUint32(b, intentMagic)
	le.PutUint32(b[4:], ino)
	le.PutUint32(b[8:], uint32(len(runs)))
	for i, r := range runs {
		le.PutUint64(b[12+12*i:], r.phys)
		le.PutUint32(b[20+12*i:], r.count)
	}
}

func (m *ext4Meta) intent() (uint32, []extent, bool) {
	b, le := m.sb[intentOff:0x3fc], binary.LittleEndian
	if le.Uint32(b) != intentMagic {
		return 0, nil, false
	}
	n := int(le.Uint32(b[8:]))
	if n > intentMax {
		return 0, nil, false
	}
	runs := make([]extent, n)
	for i := range runs {
		runs[i] = extent{phys: le.Uint64(b[12+12*i:]), count: le.Uint32(b[20+12*i:])}
	}
	return le.Uint32(b[4:]), runs, true
}

// recoverExt4 finishes or undoes a flush that a crash interrupted: each
// block its intent record lists is marked used exactly when the inode
// references it now (old layout: the new blocks are freed; new layout:
// the dropped ones are), then every count is derived from the bitmaps.
func (f *FS) recoverExt4() error {
	m, err := readExt4Meta(f.dev)
	if err != nil {
		return err
	}
	switch binary.LittleEndian.Uint32(m.sb[intentOff:]) {
	case renameMagic:
		return f.recoverRename(m)
	case unindexMagic:
		return f.recoverUnindex(m)
	case createMagic:
		return f.recoverCreate(m)
	case putMagic:
		return f.recoverPut(m)
	case mkdirMagic:
		return f.recoverMkdir(m)
	}
	ino, runs, ok := m.intent()
	if !ok {
		return f.recountStale(m)
	}
	var refs []extent
	if in, err := m.readInode(ino); err == nil && binary.LittleEndian.Uint16(in[0x1a:]) > 0 {
		if leaves, index, err := m.extents(in); err == nil {
			refs = leaves
			for _, b := range index {
				refs = append(refs, extent{phys: b, count: 1})
			}
		}
	}
	bm := &bitmaps{m: m, maps: map[int][]byte{}, dirty: map[int]bool{}}
	for _, r := range runs {
		for b := r.phys; b < r.phys+uint64(r.count); b++ {
			used := false
			for _, e := range refs {
				if b >= e.phys && b < e.phys+uint64(e.count) {
					used = true
					break
				}
			}
			if err := bm.set(b, used); err != nil {
				return fmt.Errorf("recover inode %d: %w", ino, err)
			}
		}
	}
	for g, b := range bm.maps {
		if _, err := m.dev.WriteAt(b, m.blockBitmap(g)); err != nil {
			return fmt.Errorf("write block bitmap %d: %w", g, err)
		}
		if bm.uninit[g] && !bytes.Equal(b, m.computedBlockBitmap(g)) {
			// cannot happen (a flush clears the flag before the inode
			// uses the group), but a used block must not hide behind it
			d := m.desc(g)
			binary.LittleEndian.PutUint16(d[0x12:], m.flags(g)&^bgBlockUninit)
		}
	}
	m.setIntent(0, nil)
	if err := m.recount(); err != nil {
		return err
	}
	if err := f.dev.Sync(); err != nil {
		return err
	}
	return f.reload()
}

// recountStale puts the free counts and bitmap checksums in the group
// descriptors and superblock right where a crash left them out of step
// with the bitmaps: go-diskfs writes a new file's bitmaps, descriptors
// and superblock with no order between them (creating Put's temporary
// file, a directory, an empty file), and a cut between the descriptor and
// the bitmap leaves counts e2fsck reports. What the bitmaps say is kept:
// such a cut is before the file has a name, so nothing references the
// blocks either way.
func (f *FS) recountStale(m *ext4Meta) error {
	changed, err := m.recountIfStale()
	if err != nil || !changed {
		return err
	}
	if err := f.dev.Sync(); err != nil {
		return err
	}
	return f.reload()
}

// ErrTornSuperblock means the ext4 superblock's checksum fails on a volume
// opened read-only: a crash tore its last write across two 512-byte
// sectors, and repairing it needs a writable open.
var ErrTornSuperblock = errors.New("the ext4 superblock's checksum fails: a crash tore its last write; open the volume writable once (keygate boot, or any change with keygate disk) to repair it")

// repairTornSuper mends a superblock whose write a crash tore. On a volume
// with 512-byte sectors the 1 KiB superblock spans two, and a cut between
// them leaves each half a valid old or new version, but the checksum (in
// the second) matching neither whole. Nothing in either half can be wrong
// for the volume: the geometry never changes, the intent record (second
// half) is replayed by recoverExt4 whichever version it is, and the free
// counts (first half) are derived again from the bitmaps. So the repair is
// a recount, which rewrites the superblock with its checksum. go-diskfs
// refuses the volume otherwise.
func repairTornSuper(dev *Device) error {
	m, err := readExt4Meta(dev)
	if err != nil || !m.metaCsum {
		return nil // go-diskfs reports what is wrong with it
	}
	if binary.LittleEndian.Uint32(m.sb[0x3fc:]) == crc.CRC32c(0xffffffff, m.sb[:0x3fc]) {
		return nil
	}
	if dev.readOnly {
		return ErrTornSuperblock
	}
	if err := m.sameAsBackup(); err != nil {
		return fmt.Errorf("the ext4 superblock's checksum fails and it is not a torn write (%v): restore it with e2fsck -b", err)
	}
	if err := m.recount(); err != nil {
		return fmt.Errorf("repair torn superblock: %w", err)
	}
	return dev.Sync()
}

// sameAsBackup checks that the fields a tear cannot change (geometry,
// features, UUID, checksum seed) agree with group 1's backup superblock,
// so that a superblock damaged some other way is not "repaired" into a
// checksum that makes it look sound. A filesystem of one group has no
// backup to compare with.
func (m *ext4Meta) sameAsBackup() error {
	if m.groups < 2 {
		return nil
	}
	b := make([]byte, 1024)
	if _, err := m.dev.ReadAt(b, int64(m.firstData+uint64(m.bpg))*m.bs); err != nil {
		return fmt.Errorf("read backup superblock: %w", err)
	}
	for _, f := range []struct {
		name   string
		lo, hi int
	}{
		{"magic", 0x38, 0x3a}, {"block size", 0x18, 0x1c}, {"blocks per group", 0x20, 0x24},
		{"inodes per group", 0x28, 0x2c}, {"inode size", 0x58, 0x5a}, {"compatible features", 0x5c, 0x60},
		{"UUID", 0x68, 0x78}, {"checksum seed", 0x270, 0x274},
	} {
		if f.lo == 0x270 && binary.LittleEndian.Uint32(m.sb[0x60:])&incompatCsumSeed == 0 {
			// unused without csum_seed; go-diskfs writes its computed
			// seed there in the primary, never in the backups
			continue
		}
		if string(m.sb[f.lo:f.hi]) != string(b[f.lo:f.hi]) {
			return fmt.Errorf("its %s differs from the backup's", f.name)
		}
	}
	// The kernel sets needs_recovery (and, on newer kernels, read-only
	// compatible flags such as orphan_present) in the primary only.
	le := binary.LittleEndian
	if le.Uint32(m.sb[0x60:])&^incompatRecover != le.Uint32(b[0x60:])&^incompatRecover {
		return errors.New("its incompatible features differ from the backup's")
	}
	return nil
}
