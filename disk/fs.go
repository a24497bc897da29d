package disk

import (
	"errors"
	"fmt"
	"io"
	iofs "io/fs"
	"os"
	"path"
	"strings"
	"sync"
	"time"

	"github.com/diskfs/go-diskfs/filesystem"
	"github.com/diskfs/go-diskfs/filesystem/ext4"
	"github.com/diskfs/go-diskfs/filesystem/fat32"
)

// FSType names a filesystem FS can create and open.
type FSType string

// The filesystems keygate volumes carry.
const (
	FAT32 FSType = "fat32"
	Ext4  FSType = "ext4"
)

var (
	// ErrNoSpace means the filesystem has too little free space for a Put.
	ErrNoSpace = errors.New("filesystem is full")
	// ErrNotEmpty means Remove was asked to remove a non-empty directory.
	ErrNotEmpty = errors.New("directory not empty")
	// ErrUnknownFS means OpenFS found neither FAT32 nor ext4 on the device.
	ErrUnknownFS = errors.New("no FAT32 or ext4 filesystem found (create one with mkfs)")
	// ErrJournalNeedsReplay means a writable OpenFS found an ext4 whose
	// journal a kernel left unreplayed (it had the volume mounted over
	// NBD when it stopped). go-diskfs cannot replay it, and writing under
	// it would be undone by the kernel's replay at its next mount.
	ErrJournalNeedsReplay = errors.New("the ext4 journal needs replay (a kernel had the volume mounted over NBD when it stopped): serve it over NBD and mount it once, or run e2fsck on it, before opening its files here")
)

// MinFAT32Size is the smallest volume Mkfs formats as FAT32: the size at
// which go-diskfs's layout (512-byte clusters) reaches 65525 clusters.
const MinFAT32Size = 33 << 20

// ioChunk is the size of the reads and writes FS issues to go-diskfs: big,
// so that ext4 allocates few extents and the Device uses the batch cipher,
// and a multiple of every block size, so offsets stay block-aligned (#429).
const ioChunk = 4 << 20

// FileInfo describes one file or directory.
type FileInfo struct {
	Name    string
	Size    int64
	Mode    iofs.FileMode
	ModTime time.Time
	IsDir   bool
}

// FS is a FAT32 or ext4 filesystem on a whole Device (no partition table).
// Paths are slash-separated and absolute or relative to the root. Methods
// are safe for concurrent use; they are serialised, as go-diskfs is not.
type FS struct {
	mu  sync.Mutex
	dev *Device
	fs  filesystem.FileSystem
	typ FSType
	ext *ext4Meta // ext4 only: our reader of its on-disk metadata

	files map[string]*openFile // files open through OpenFile, by fileKey

	inPlace, whole int // flushes of open files written in place, and whole (tests read them)

	plog putLog // ext4: the record of a Put in progress (ext4put.go)

	pending *pendingFlush // ext4: a writeback in flight (fs_file.go)
}

// Mkfs creates a filesystem of type t over the whole device and returns it.
// ext4 gets 4 KiB blocks whatever the size (go-diskfs mishandles 1 KiB
// blocks, see #425) and lazy-init block groups: what it writes does not
// grow with the size (ext4mkfs.go).
func Mkfs(dev *Device, t FSType, label string) (*FS, error) {
	f := &FS{dev: dev, typ: t}
	var err error
	switch t {
	case FAT32:
		f.fs, err = createFAT32(dev, label)
	case Ext4:
		// our own writer, not go-diskfs's: it writes metadata in
		// proportion to the size (ext4mkfs.go)
		err = mkfsExt4(dev, label)
	default:
		return nil, fmt.Errorf("mkfs: unknown filesystem type %q (use %s or %s)", t, Ext4, FAT32)
	}
	if err != nil {
		return nil, fmt.Errorf("mkfs %s: %w", t, err)
	}
	if err := f.reload(); err != nil {
		return nil, fmt.Errorf("mkfs %s: %w", t, err)
	}
	if err := dev.Flush(); err != nil {
		return nil, fmt.Errorf("mkfs %s: %w", t, err)
	}
	return f, nil
}

// createFAT32 works around go-diskfs sizing the FAT too small for some
// volume sizes (64 MiB: 129024 clusters, room for 129022; fsck.fat
// rejects it): it shrinks the filesystem a little until the FAT fits.
//
// It also refuses volumes under MinFAT32Size, before writing anything:
// by the FAT specification a volume with fewer than 65525 clusters is
// FAT12/16 whatever its boot sector says, and Windows would misread it.
func createFAT32(dev *Device, label string) (filesystem.FileSystem, error) {
	size := dev.Size()
	if size < MinFAT32Size {
		return nil, fmt.Errorf("a %d-byte volume is too small for FAT32, which needs at least %d MiB (use ext4 or a bigger volume)",
			size, MinFAT32Size>>20)
	}
	for try := 0; ; try++ {
		fs, err := fat32.Create(dev, size, 0, 512, label, false)
		if err != nil {
			return nil, err
		}
		g, err := readFATGeom(dev)
		if err != nil {
			return nil, err
		}
		if int64(g.clusters)+2 <= g.fatLen/4 {
			return fs, nil
		}
		if try == 8 {
			return nil, fmt.Errorf("go-diskfs made a FAT too small for %d clusters; try another size", g.clusters)
		}
		size -= 64 << 10
	}
}

// OpenFS opens the FAT32 or ext4 filesystem on dev.
func OpenFS(dev *Device) (*FS, error) {
	f := &FS{dev: dev}
	if fs, err := fat32.Read(dev, dev.Size(), 0, 512); err == nil {
		f.fs, f.typ = fs, FAT32
		return f, nil
	}
	var sb [2]byte
	if _, err := dev.ReadAt(sb[:], 1024+0x38); err != nil || sb != [2]byte{0x53, 0xef} {
		return nil, ErrUnknownFS
	}
	f.typ = Ext4
	var incompat [4]byte
	if _, err := dev.ReadAt(incompat[:], 1024+0x60); err == nil && !dev.readOnly && incompat[0]&incompatRecover != 0 {
		return nil, ErrJournalNeedsReplay
	}
	if err := repairTornSuper(dev); err != nil {
		return nil, fmt.Errorf("open ext4: %w", err)
	}
	if err := f.reload(); err != nil {
		return nil, fmt.Errorf("open ext4: %w", err)
	}
	if !dev.readOnly {
		// finish or undo an in-place flush a crash interrupted (ext4write.go)
		if err := f.recoverExt4(); err != nil {
			return nil, fmt.Errorf("open ext4: recover an interrupted flush: %w", err)
		}
	}
	return f, nil
}

// reload re-reads the filesystem from the device. go-diskfs keeps the
// superblock, group descriptors and FAT in memory and writes them back
// whole, so after we patch them on disk it must forget its copies.
func (f *FS) reload() error {
	var err error
	switch f.typ {
	case FAT32:
		f.fs, err = fat32.Read(f.dev, f.dev.Size(), 0, 512)
	case Ext4:
		var lazy *ext4Meta
		if lazy, err = readExt4Meta(f.dev); err != nil {
			return err
		}
		f.fs, err = ext4.Read(&putWatch{Storage: newLazyExt4(f.dev, lazy), log: &f.plog}, f.dev.Size(), 0, 512)
		if err == nil {
			f.ext, err = readExt4Meta(f.dev)
		}
	}
	return err
}

// Type is the filesystem type.
func (f *FS) Type() FSType { return f.typ }

// Label is the volume label, trimmed.
func (f *FS) Label() string {
	f.lock()
	defer f.mu.Unlock()
	return strings.TrimSpace(f.fs.Label())
}

// Sync writes everything cached to the image and fsyncs it.
func (f *FS) Sync() error {
	f.lock()
	defer f.mu.Unlock()
	return f.sync()
}

func (f *FS) sync() error {
	if f.dev.readOnly {
		return nil // nothing can have changed
	}
	if f.typ == FAT32 {
		if err := f.writeFSInfo(); err != nil {
			return fmt.Errorf("sync: write FSInfo: %w", err)
		}
	}
	return f.dev.Sync()
}

// Close stores the writes of files still open (see OpenFile) and syncs.
// It does not close the Device, which belongs to the caller.
func (f *FS) Close() error {
	f.lock()
	defer f.mu.Unlock()
	if err := f.flushOpen(); err != nil {
		return fmt.Errorf("close filesystem: %w", err)
	}
	if err := f.fs.Close(); err != nil {
		return fmt.Errorf("close filesystem: %w", err)
	}
	return f.sync()
}

// clean turns a user path into go-diskfs's form: no leading slash, "."
// for the root. ".." cannot climb above the root.
func clean(p string) string {
	p = strings.TrimPrefix(path.Clean("/"+p), "/")
	if p == "" {
		return "."
	}
	return p
}

func display(p string) string { return "/" + strings.TrimPrefix(p, ".") }

// Stat describes the file or directory at p.
func (f *FS) Stat(p string) (FileInfo, error) {
	f.lock()
	defer f.mu.Unlock()
	return f.statLive(clean(p))
}

func (f *FS) stat(p string) (FileInfo, error) {
	if p == "." {
		return FileInfo{Name: "/", Mode: iofs.ModeDir | 0o755, IsDir: true}, nil
	}
	dir, base := path.Dir(p), path.Base(p)
	if dir != "." {
		di, err := f.stat(dir)
		if err != nil {
			return FileInfo{}, err
		}
		if !di.IsDir {
			return FileInfo{}, fmt.Errorf("%s: %s is not a directory: %w", display(p), display(dir), iofs.ErrNotExist)
		}
	}
	entries, err := f.fs.ReadDir(dir)
	if err != nil {
		return FileInfo{}, fmt.Errorf("read directory %s: %w", display(dir), err)
	}
	for _, e := range entries {
		if f.nameIs(e.Name(), base) {
			return info(e)
		}
	}
	return FileInfo{}, fmt.Errorf("%s: no such file or directory: %w", display(p), iofs.ErrNotExist)
}

// nameIs compares names as the filesystem does: FAT is case-insensitive.
func (f *FS) nameIs(a, b string) bool {
	if f.typ == FAT32 {
		return strings.EqualFold(a, b)
	}
	return a == b
}

func info(e iofs.DirEntry) (FileInfo, error) {
	i, err := e.Info()
	if err != nil {
		return FileInfo{}, fmt.Errorf("stat %s: %w", e.Name(), err)
	}
	fi := FileInfo{Name: e.Name(), Size: i.Size(), Mode: i.Mode(), ModTime: i.ModTime(), IsDir: e.IsDir()}
	if fi.IsDir {
		fi.Size = 0
		fi.Mode |= iofs.ModeDir
	}
	return fi, nil
}

// ReadDir lists the directory at p, without "." and "..".
func (f *FS) ReadDir(p string) ([]FileInfo, error) {
	f.lock()
	defer f.mu.Unlock()
	p = clean(p)
	if err := f.mustBeDir(p); err != nil {
		return nil, err
	}
	entries, err := f.fs.ReadDir(p)
	if err != nil {
		return nil, fmt.Errorf("read directory %s: %w", display(p), err)
	}
	out := make([]FileInfo, 0, len(entries))
	for _, e := range entries {
		if e.Name() == "." || e.Name() == ".." || e.Name() == "" {
			continue
		}
		fi, err := info(e)
		if err != nil {
			return nil, err
		}
		out = append(out, fi)
	}
	return out, nil
}

func (f *FS) isDir(p string) bool {
	fi, err := f.stat(p)
	return err == nil && fi.IsDir
}

func (f *FS) mustBeDir(p string) error {
	fi, err := f.stat(p)
	if errors.Is(err, iofs.ErrNotExist) {
		return fmt.Errorf("directory %s does not exist (create it with mkdir): %w", display(p), iofs.ErrNotExist)
	}
	if err != nil {
		return err
	}
	if !fi.IsDir {
		return fmt.Errorf("%s is a file, not a directory: %w", display(p), ErrNotDir)
	}
	return nil
}

// Mkdir creates the directory p and any missing parents. It is not an
// error if p already is a directory.
func (f *FS) Mkdir(p string) error {
	f.lock()
	defer f.mu.Unlock()
	return f.mkdir(clean(p))
}

func (f *FS) mkdir(p string) error {
	// refuse to pass through a file: go-diskfs's message is less clear
	for q := p; q != "."; q = path.Dir(q) {
		if fi, err := f.stat(q); err == nil && !fi.IsDir {
			return fmt.Errorf("mkdir %s: %s is a file: %w", display(p), display(q), ErrNotDir)
		}
	}
	if f.typ == Ext4 {
		// in ordered steps, not go-diskfs's unordered batch (ext4mkdir.go)
		if done, err := f.mkdirAllExt4(p); err != nil {
			return err
		} else if done {
			return nil
		}
	}
	top := strings.Split(p, "/")[0]
	_, err := f.stat(top)
	newTop := err != nil
	// go-diskfs adds the first missing name to a directory that exists
	for q := p; f.typ == Ext4; q = path.Dir(q) {
		if _, err := f.stat(q); err == nil {
			break
		}
		if d := path.Dir(q); d == "." || f.isDir(d) {
			if err := f.unindexParent(q); err != nil {
				return fmt.Errorf("mkdir %s: %w", display(p), err)
			}
			break
		}
	}
	if err := f.fs.Mkdir(p); err != nil {
		return fmt.Errorf("mkdir %s: %w", display(p), err)
	}
	if f.typ == FAT32 && newTop {
		if err := f.fixDotDot(top); err != nil {
			return fmt.Errorf("mkdir %s: %w", display(p), err)
		}
	}
	return nil
}

// Remove removes the file or empty directory at p.
func (f *FS) Remove(p string) error {
	f.lock()
	defer f.mu.Unlock()
	p = clean(p)
	if p == "." {
		return errors.New("remove /: cannot remove the root directory")
	}
	fi, err := f.stat(p)
	if err != nil {
		return fmt.Errorf("remove: %w", err)
	}
	if fi.IsDir {
		entries, err := f.fs.ReadDir(p)
		if err != nil {
			return fmt.Errorf("remove %s: %w", display(p), err)
		}
		for _, e := range entries {
			if e.Name() != "." && e.Name() != ".." {
				return fmt.Errorf("remove %s: %w (remove its contents first)", display(p), ErrNotEmpty)
			}
		}
	}
	f.detach(p)
	return f.remove(p, fi.IsDir)
}

func (f *FS) remove(p string, isDir bool) error {
	var err error
	switch {
	case f.typ == Ext4:
		err = f.removeExt4(p, isDir)
	case !isDir && f.emptyFAT(p):
		// an empty file owns no cluster (fixEmptyFAT), and removeFAT
		// fails to read its empty chain; go-diskfs's Remove has nothing
		// to leak here
		if err = f.fs.Remove(p); err == nil {
			err = f.reload()
		}
	default:
		err = f.removeFAT(p)
	}
	if err != nil {
		return fmt.Errorf("remove %s: %w", display(p), err)
	}
	return nil
}

// Get writes the content of the file at p to w and returns its length.
func (f *FS) Get(p string, w io.Writer) (int64, error) {
	r, err := f.Open(p)
	if err != nil {
		return 0, err
	}
	buf := make([]byte, ioChunk)
	defer clear(buf)
	var off int64
	for off < r.Size() {
		n, err := r.ReadAt(buf, off)
		if n > 0 {
			if _, werr := w.Write(buf[:n]); werr != nil {
				return off, fmt.Errorf("get %s: write: %w", display(clean(p)), werr)
			}
			off += int64(n)
		}
		if err == io.EOF {
			break
		}
		if err != nil {
			return off, err
		}
	}
	return off, nil
}

// Put stores r's content as the file p, replacing any previous file
// there. size is the content length, or -1 when unknown. The parent
// directory must exist. When the filesystem has too little room Put fails
// with ErrNoSpace, and the previous file at p, if any, is left as it was.
func (f *FS) Put(p string, r io.Reader, size int64) error {
	f.lock()
	defer f.mu.Unlock()
	p = clean(p)
	f.detach(p)
	return f.put(p, r, size)
}

func (f *FS) put(p string, r io.Reader, size int64) error {
	if p == "." {
		return errors.New("put /: the root is a directory; name a file")
	}
	if err := f.mustBeDir(path.Dir(p)); err != nil {
		return fmt.Errorf("put %s: %w", display(p), err)
	}
	old, err := f.stat(p)
	exists := err == nil
	if exists && old.IsDir {
		return fmt.Errorf("put %s: a directory is in the way (remove it or choose another name): %w", display(p), ErrIsDir)
	}
	if f.typ == FAT32 && size > 0xFFFFFFFF {
		return fmt.Errorf("put %s: %d bytes is over FAT32's 4 GiB-1 file size limit (use ext4)", display(p), size)
	}
	if size >= 0 {
		if err := f.checkSpace(p, size, 0); err != nil {
			return err
		}
	}
	target := p
	if exists || f.typ == Ext4 && size != 0 {
		// write beside the old file, so that a failure leaves it intact;
		// on ext4 a new file with content too, so that a crash never
		// shows it partial
		target = path.Join(path.Dir(p), "."+path.Base(p)+".keygate-put")
		if _, err := f.stat(target); err == nil {
			if err := f.remove(target, false); err != nil {
				return fmt.Errorf("put %s: clear stale temporary file: %w", display(p), err)
			}
		}
	}
	recorded := false // a crash removes the temporary file (ext4put.go)
	if f.typ == Ext4 {
		// the name in ordered steps, not in go-diskfs's unordered batch
		// (ext4create.go); go-diskfs then only writes the content
		ok, err := f.createExt4(target, target != p)
		if err != nil {
			return fmt.Errorf("put %s: %w", display(p), err)
		}
		recorded = ok && target != p
	}
	n, err := f.write(target, r, size)
	if recorded {
		f.stopPut()
	}
	if err != nil {
		if recorded {
			// as after a crash: the record removes the temporary file
			if rerr := f.recoverExt4(); rerr != nil {
				return fmt.Errorf("put %s: %w (and removing the partial file failed: %v)", display(p), err, rerr)
			}
		}
		if _, serr := f.stat(target); serr != nil {
			return fmt.Errorf("put %s: %w", display(p), err) // nothing was created
		}
		if rerr := f.remove(target, false); rerr != nil {
			err = fmt.Errorf("%w (and removing the partial file failed: %v)", err, rerr)
		}
		return fmt.Errorf("put %s: %w", display(p), err)
	}
	if f.typ == FAT32 && n == 0 {
		if err := f.fixEmptyFAT(target); err != nil {
			return fmt.Errorf("put %s: %w", display(p), err)
		}
	}
	if target == p {
		return nil
	}
	return f.replace(p, target)
}

// replace moves the finished temporary file tmp over p. On ext4 that is
// a rename (ext4rename.go): p shows the old file or the new one, whole,
// whenever a crash comes. On FAT it is remove-then-rename: a crash between
// the two leaves no p and the complete new content in tmp.
func (f *FS) replace(p, tmp string) error {
	if f.typ == Ext4 {
		if err := f.replaceExt4(tmp, p); err != nil {
			// Put's record must not outlive the Put: it lists blocks
			// that may be another file's later (ext4put.go)
			if rerr := f.recoverExt4(); rerr != nil {
				err = fmt.Errorf("%w (and removing the temporary file failed: %v)", err, rerr)
			}
			return fmt.Errorf("put %s: %w", display(p), err)
		}
		return nil
	}
	if err := f.remove(p, false); err != nil {
		return fmt.Errorf("put %s: %w", display(p), err)
	}
	if err := f.fs.Rename(tmp, p); err != nil {
		return fmt.Errorf("put %s: rename %s: %w", display(p), display(tmp), err)
	}
	return nil
}

// write creates file p and streams r into it in block-aligned chunks.
func (f *FS) write(p string, r io.Reader, size int64) (int64, error) {
	if err := f.unindexParent(p); err != nil {
		return 0, err
	}
	fl, err := f.fs.OpenFile(p, os.O_CREATE|os.O_RDWR)
	if err != nil {
		return 0, fmt.Errorf("create: %w", err)
	}
	defer fl.Close()
	buf := make([]byte, ioChunk)
	defer clear(buf)
	var total int64
	for {
		n, rerr := io.ReadFull(r, buf)
		if n > 0 {
			if f.typ == FAT32 && total+int64(n) > 0xFFFFFFFF {
				return total, errors.New("over FAT32's 4 GiB-1 file size limit (use ext4)")
			}
			if _, err := fl.Write(buf[:n]); err != nil {
				if free, ferr := f.freeSpace(); ferr == nil && free < int64(n)+ioChunk {
					return total, fmt.Errorf("%w after %d bytes (remove files or use a bigger volume): %v", ErrNoSpace, total, err)
				}
				return total, fmt.Errorf("write: %w", err)
			}
			total += int64(n)
		}
		if rerr == io.EOF || rerr == io.ErrUnexpectedEOF {
			break
		}
		if rerr != nil {
			return total, fmt.Errorf("read input: %w", rerr)
		}
	}
	if size >= 0 && total != size {
		return total, fmt.Errorf("input had %d bytes, expected %d", total, size)
	}
	if f.typ == Ext4 && f.ext.metaCsum {
		if err := f.sealExtentBlocks(p); err != nil {
			return total, err
		}
	}
	return total, nil
}

// checkSpace fails with ErrNoSpace unless size bytes fit, counting
// reclaim bytes that will be freed first.
func (f *FS) checkSpace(p string, size, reclaim int64) error {
	free, err := f.freeSpace()
	if err != nil {
		return fmt.Errorf("put %s: %w", display(p), err)
	}
	need := f.need(size)
	if need > free+f.need(reclaim)-f.need(0) {
		return fmt.Errorf("put %s: %w: need %d bytes, %d free (remove files or use a bigger volume)",
			display(p), ErrNoSpace, need, free)
	}
	return nil
}

// FreeSpace returns the bytes free for file data.
func (f *FS) FreeSpace() (int64, error) {
	f.lock()
	defer f.mu.Unlock()
	return f.freeSpace()
}
