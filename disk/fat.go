package disk

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path"

	"github.com/diskfs/go-diskfs/filesystem/fat12"
	"github.com/diskfs/go-diskfs/filesystem/fat32"
)

// fatGeom is the part of the FAT32 boot sector we need to read the FAT.
type fatGeom struct {
	fatOff, fatLen int64 // first FAT copy, bytes
	fats           int
	clusters       uint32 // data clusters, numbered from 2
	clusterSize    int64
	bps            int64
	fsinfo         int64 // byte offset of the FSInfo sector, 0 if none
}

func readFATGeom(dev *Device) (fatGeom, error) {
	b := make([]byte, 512)
	if _, err := dev.ReadAt(b, 0); err != nil {
		return fatGeom{}, fmt.Errorf("read boot sector: %w", err)
	}
	le := binary.LittleEndian
	bps, spc := int64(le.Uint16(b[0x0b:])), int64(b[0x0d])
	res, fats := int64(le.Uint16(b[0x0e:])), int64(b[0x10])
	total, fatSz := int64(le.Uint32(b[0x20:])), int64(le.Uint32(b[0x24:]))
	if bps == 0 || spc == 0 || fats == 0 || fatSz == 0 {
		return fatGeom{}, errors.New("read boot sector: not FAT32")
	}
	g := fatGeom{fatOff: res * bps, fatLen: fatSz * bps, fats: int(fats),
		clusters: uint32((total - res - fats*fatSz) / spc), clusterSize: spc * bps, bps: bps}
	if s := int64(le.Uint16(b[0x30:])); s != 0 && s != 0xffff && s < res {
		g.fsinfo = s * bps
	}
	return g, nil
}

// removeFAT removes p and frees its clusters, which go-diskfs v1.9.4's
// FAT Remove (and Rename over an existing name) leaves allocated: lost
// clusters, as fsck.fat reports. We clear the chain in every FAT copy on
// disk and reload, since go-diskfs writes its in-memory FAT back whole.
func (f *FS) removeFAT(p string) error {
	fl, err := f.fs.OpenFile(p, os.O_RDONLY)
	if err != nil {
		return err
	}
	ff, ok := fl.(*fat12.File)
	if !ok {
		return fmt.Errorf("unexpected FAT file type %T", fl)
	}
	chain, err := ff.GetClusterChain()
	if err != nil {
		return fmt.Errorf("read cluster chain: %w", err)
	}
	if err := f.fs.Remove(p); err != nil {
		return err
	}
	if err := f.freeClusters(chain); err != nil {
		return err
	}
	if err := f.reload(); err != nil {
		return fmt.Errorf("reload filesystem: %w", err)
	}
	return nil
}

// freeSpace returns the bytes free for file data.
func (f *FS) freeSpace() (int64, error) {
	if f.typ == Ext4 {
		var b [8]byte
		le := binary.LittleEndian
		if _, err := f.dev.ReadAt(b[:4], 1024+0x0c); err != nil {
			return 0, fmt.Errorf("read superblock: %w", err)
		}
		free := uint64(le.Uint32(b[:]))
		if _, err := f.dev.ReadAt(b[4:], 1024+0x158); err != nil {
			return 0, fmt.Errorf("read superblock: %w", err)
		}
		free |= uint64(le.Uint32(b[4:])) << 32
		return int64(free) * f.ext.bs, nil
	}
	g, err := readFATGeom(f.dev)
	if err != nil {
		return 0, err
	}
	fat := make([]byte, int64(g.clusters+2)*4)
	if _, err := f.dev.ReadAt(fat, g.fatOff); err != nil {
		return 0, fmt.Errorf("read FAT: %w", err)
	}
	var free int64
	for c := uint32(2); c < g.clusters+2; c++ {
		if binary.LittleEndian.Uint32(fat[c*4:])&0x0fffffff == 0 {
			free++
		}
	}
	return free * g.clusterSize, nil
}

// need estimates the free bytes a file of size bytes takes, generously:
// data blocks, extent-tree blocks, and growth of its directory.
func (f *FS) need(size int64) int64 {
	if f.typ == Ext4 {
		bs := f.ext.bs
		blocks := (size + bs - 1) / bs
		return (blocks + blocks/256 + 2) * bs
	}
	g, err := readFATGeom(f.dev)
	if err != nil {
		return size
	}
	clusters := max((size+g.clusterSize-1)/g.clusterSize, 1)
	return (clusters + 1) * g.clusterSize
}

// fixDotDot works around go-diskfs giving a new top-level directory a ".."
// entry that points at the root's cluster; FAT wants 0 there, and
// fsck.fat reports "Invalid '..' entry". p is a top-level directory.
func (f *FS) fixDotDot(p string) error {
	fl, err := f.fs.OpenFile(p, os.O_RDONLY)
	if err != nil {
		return err
	}
	chain, err := fl.(*fat12.File).GetClusterChain()
	if err != nil || len(chain) == 0 {
		return fmt.Errorf("read cluster chain of %s: %v", display(p), err)
	}
	fs := f.fs.(*fat32.FileSystem)
	off := int64(fs.DataStart()) + int64(chain[0]-2)*int64(fs.BytesPerCluster()) + 32
	ent := make([]byte, 32)
	if _, err := f.dev.ReadAt(ent, off); err != nil {
		return err
	}
	if string(ent[:11]) != "..         " {
		return nil
	}
	clear(ent[0x14:0x16])
	clear(ent[0x1a:0x1c])
	_, err = f.dev.WriteAt(ent, off)
	return err
}

// writeFSInfo records the free cluster count in the FSInfo sector, which
// go-diskfs leaves "unknown"; fsck.fat flags that.
func (f *FS) writeFSInfo() error {
	g, err := readFATGeom(f.dev)
	if err != nil {
		return err
	}
	free, err := f.freeSpace()
	if err != nil {
		return err
	}
	if g.fsinfo == 0 {
		return nil
	}
	var v [4]byte
	binary.LittleEndian.PutUint32(v[:], uint32(free/g.clusterSize))
	_, err = f.dev.WriteAt(v[:], g.fsinfo+0x1e8)
	return err
}

// fixEmptyFAT gives the empty file p no cluster. go-diskfs allocates one
// cluster to every new file, so an empty file would own a cluster, which
// fsck.fat reports ("File size is 0 bytes, cluster chain length is > 0").
// We find its directory entry by that cluster, set the start cluster to 0
// and free the cluster in every FAT copy, then reload.
func (f *FS) fixEmptyFAT(p string) error {
	cluster, err := f.firstCluster(p)
	if err != nil {
		return err
	}
	var dirChain []uint32
	if dir := path.Dir(p); dir == "." {
		var b [4]byte
		if _, err := f.dev.ReadAt(b[:], 0x2c); err != nil {
			return err
		}
		root := binary.LittleEndian.Uint32(b[:])
		if dirChain, err = f.chainFrom(root); err != nil {
			return err
		}
	} else {
		c, err := f.firstCluster(dir)
		if err != nil {
			return err
		}
		if dirChain, err = f.chainFrom(c); err != nil {
			return err
		}
	}
	fs := f.fs.(*fat32.FileSystem)
	bpc := int64(fs.BytesPerCluster())
	buf := make([]byte, bpc)
	le := binary.LittleEndian
	found := false
	for _, dc := range dirChain {
		off := int64(fs.DataStart()) + int64(dc-2)*bpc
		if _, err := f.dev.ReadAt(buf, off); err != nil {
			return err
		}
		for i := 0; i < len(buf); i += 32 {
			e := buf[i : i+32]
			if e[0] == 0 {
				break
			}
			if e[0] == 0xe5 || e[11] == 0x0f || e[11]&0x18 != 0 {
				continue
			}
			c := uint32(le.Uint16(e[0x14:]))<<16 | uint32(le.Uint16(e[0x1a:]))
			if c == cluster && le.Uint32(e[0x1c:]) == 0 {
				clear(e[0x14:0x16])
				clear(e[0x1a:0x1c])
				if _, err := f.dev.WriteAt(e, off+int64(i)); err != nil {
					return err
				}
				found = true
			}
		}
	}
	if !found {
		return nil // leave it: allocated but consistent
	}
	if err := f.freeClusters([]uint32{cluster}); err != nil {
		return err
	}
	return f.reload()
}

func (f *FS) firstCluster(p string) (uint32, error) {
	fl, err := f.fs.OpenFile(p, os.O_RDONLY)
	if err != nil {
		return 0, err
	}
	chain, err := fl.(*fat12.File).GetClusterChain()
	if err != nil || len(chain) == 0 {
		return 0, fmt.Errorf("read cluster chain of %s: %v", display(p), err)
	}
	return chain[0], nil
}

// chainFrom follows the FAT from cluster c.
func (f *FS) chainFrom(c uint32) ([]uint32, error) {
	g, err := readFATGeom(f.dev)
	if err != nil {
		return nil, err
	}
	var chain []uint32
	var b [4]byte
	for c >= 2 && c < g.clusters+2 && len(chain) <= int(g.clusters) {
		chain = append(chain, c)
		if _, err := f.dev.ReadAt(b[:], g.fatOff+int64(c)*4); err != nil {
			return nil, err
		}
		c = binary.LittleEndian.Uint32(b[:]) & 0x0fffffff
	}
	return chain, nil
}

// freeClusters marks clusters free in every FAT copy, on disk.
func (f *FS) freeClusters(clusters []uint32) error {
	g, err := readFATGeom(f.dev)
	if err != nil {
		return err
	}
	var zero [4]byte
	for _, c := range clusters {
		if c < 2 || c >= g.clusters+2 {
			continue
		}
		for i := 0; i < g.fats; i++ {
			if _, err := f.dev.WriteAt(zero[:], g.fatOff+int64(i)*g.fatLen+int64(c)*4); err != nil {
				return fmt.Errorf("free cluster %d: %w", c, err)
			}
		}
	}
	return nil
}
