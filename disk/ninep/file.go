package ninep

import (
	"errors"
	"hash/fnv"
	"io"
	iofs "io/fs"
	"os"
	"path"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/hugelgupf/p9/fsimpl/templatefs"
	"github.com/hugelgupf/p9/linux"
	"github.com/hugelgupf/p9/p9"

	"github.com/keygate/keygate/disk"
)

// Linux open(2) bits as 9P2000.L carries them (P9_DOTL_*).
const (
	oCreat  = 0o100
	oExcl   = 0o200
	oTrunc  = 0o1000
	atRmdir = 0x200 // AT_REMOVEDIR in Tunlinkat
)

// The attributes FAT and go-diskfs cannot keep are reported as fixed
// values: owner root, mode 0755 for directories and 0644 for files.
const (
	dirMode  = p9.ModeDirectory | 0o755
	fileMode = p9.ModeRegular | 0o644
)

// attacher and file implement hugelgupf/p9's p9.File, which is how the
// package's internal tests drive them; the server (conn.go) calls the same
// methods.
type attacher struct{ s *Server }

func (a *attacher) Attach() (p9.File, error) { return &file{s: a.s, path: "/", isDir: true}, nil }

// file is one fid: a path in the exported tree, and once opened a
// disk.File (regular files) or a directory listing.
type file struct {
	templatefs.NoopFile
	s *Server
	// path (absolute, slash-separated) and deleted change only under
	// s.tree held alone (rename, unlink); requests read them holding it
	// shared.
	path    string
	deleted bool // the file was removed: no more walks, opens or changes
	isDir   bool // what the walk found

	// mu: I/O through the fid (shared) against opening and closing it.
	mu     sync.RWMutex
	opened atomic.Bool  // set under mu; read bare where only tree is held
	flags  p9.OpenFlags // as opened; under mu

	h   *disk.File      // after Open or Create of a regular file
	dir []disk.FileInfo // after Open of a directory: the listing Readdir serves
	isD bool            // opened as a directory
}

func (f *file) child(name string) string { return path.Join(f.path, name) }

// qid derives a stable QID path from the file's path: go-diskfs exposes no
// inode numbers for FAT, and the kernel needs only uniqueness. FAT names
// are case-insensitive, so they hash folded.
func (s *Server) qid(p string, isDir bool) p9.QID {
	if s.fsys.Type() == disk.FAT32 {
		p = strings.ToLower(p)
	}
	h := fnv.New64a()
	h.Write([]byte(p))
	q := p9.QID{Type: p9.TypeRegular, Path: h.Sum64()}
	if isDir {
		q.Type = p9.TypeDir
	}
	return q
}

// errno maps disk and go-diskfs errors onto the errnos a Linux client
// understands. Anything unrecognised is EIO, and is logged, as it may be a
// device or filesystem fault rather than a caller's mistake.
func (s *Server) errno(op, p string, err error) error {
	if err == nil {
		return nil
	}
	var e linux.Errno
	switch {
	case errors.As(err, &e):
		return e
	case errors.Is(err, iofs.ErrNotExist):
		e = linux.ENOENT
	case errors.Is(err, iofs.ErrExist):
		e = linux.EEXIST
	case errors.Is(err, disk.ErrNotDir):
		e = linux.ENOTDIR
	case errors.Is(err, disk.ErrIsDir):
		e = linux.EISDIR
	case errors.Is(err, disk.ErrNotEmpty):
		e = linux.ENOTEMPTY
	case errors.Is(err, disk.ErrNoSpace):
		e = linux.ENOSPC
	case errors.Is(err, disk.ErrReadOnly):
		e = linux.EROFS
	case errors.Is(err, disk.ErrTooLarge):
		e = linux.EFBIG
	case errors.Is(err, disk.ErrCannotMove):
		e = linux.EXDEV
	case errors.Is(err, disk.ErrInvalid):
		e = linux.EINVAL
	case errors.Is(err, iofs.ErrPermission), errors.Is(err, iofs.ErrClosed):
		e = linux.EBADF
	default:
		s.log.Error("9p operation failed", "op", op, "path", p, "err", err)
		return linux.EIO
	}
	s.log.Debug("9p operation refused", "op", op, "path", p, "errno", e.Error(), "err", err)
	return e
}

// changed makes a metadata change durable before the reply goes out, so
// that the client's view never runs ahead of what survives a crash.
func (f *file) changed(op, p string) error {
	return f.s.errno(op, p, f.s.fsys.Sync())
}

func (f *file) writeAllowed(op string) error {
	if f.s.readOnly || f.s.fsys.ReadOnly() {
		return f.s.errno(op, f.path, disk.ErrReadOnly)
	}
	return nil
}

func (f *file) Walk(names []string) ([]p9.QID, p9.File, error) {
	if len(names) == 0 {
		fi, err := f.s.fsys.Stat(f.path)
		if err != nil {
			return nil, nil, f.s.errno("walk", f.path, err)
		}
		return []p9.QID{f.s.qid(f.path, fi.IsDir)}, &file{s: f.s, path: f.path, isDir: fi.IsDir}, nil
	}
	var qids []p9.QID
	p, dir := f.path, true
	for _, n := range names {
		p = path.Join(p, n)
		fi, err := f.s.fsys.Stat(p)
		if err != nil {
			return nil, nil, f.s.errno("walk", p, err)
		}
		qids = append(qids, f.s.qid(p, fi.IsDir))
		dir = fi.IsDir
	}
	return qids, &file{s: f.s, path: p, isDir: dir}, nil
}

func (f *file) WalkGetAttr(names []string) ([]p9.QID, p9.File, p9.AttrMask, p9.Attr, error) {
	return nil, nil, p9.AttrMask{}, p9.Attr{}, linux.ENOSYS // the server falls back to Walk, then GetAttr
}

func (f *file) attr(fi disk.FileInfo) p9.Attr {
	a := p9.Attr{Mode: fileMode, NLink: 1, Size: uint64(fi.Size), BlockSize: 4096,
		Blocks: (uint64(fi.Size) + 511) / 512}
	if fi.IsDir {
		a.Mode, a.NLink, a.Size, a.Blocks = dirMode, 2, 4096, 8
	}
	if h := f.h; h != nil {
		a.Size = uint64(h.Size())
		a.Blocks = (a.Size + 511) / 512
	}
	if !fi.ModTime.IsZero() && fi.ModTime.Unix() > 0 {
		sec, ns := uint64(fi.ModTime.Unix()), uint64(fi.ModTime.Nanosecond())
		a.ATimeSeconds, a.ATimeNanoSeconds = sec, ns
		a.MTimeSeconds, a.MTimeNanoSeconds = sec, ns
		a.CTimeSeconds, a.CTimeNanoSeconds = sec, ns
	}
	return a
}

func (f *file) GetAttr(req p9.AttrMask) (p9.QID, p9.AttrMask, p9.Attr, error) {
	fi, err := f.s.fsys.Stat(f.path)
	if errors.Is(err, iofs.ErrNotExist) && f.h != nil {
		// removed while open: fstat still works, as on a local filesystem
		fi, err = disk.FileInfo{Name: path.Base(f.path)}, nil
	}
	if err != nil {
		return p9.QID{}, p9.AttrMask{}, p9.Attr{}, f.s.errno("getattr", f.path, err)
	}
	valid := p9.AttrMask{Mode: true, NLink: true, UID: true, GID: true, Size: true,
		ATime: true, MTime: true, CTime: true, Blocks: true}
	return f.s.qid(f.path, fi.IsDir), valid, f.attr(fi), nil
}

// SetAttr changes the size. Mode, owner and times are accepted and
// ignored: FAT cannot hold them and keygate reports fixed values, and
// refusing would break cp -p, touch and tar for no gain.
func (f *file) SetAttr(valid p9.SetAttrMask, attr p9.SetAttr) error {
	if !valid.Size {
		return nil
	}
	if err := f.writeAllowed("setattr"); err != nil {
		return err
	}
	if attr.Size > 1<<62 {
		return linux.EFBIG
	}
	if f.h != nil {
		return f.s.errno("truncate", f.path, f.h.Truncate(int64(attr.Size)))
	}
	return f.s.errno("truncate", f.path, f.s.fsys.Truncate(f.path, int64(attr.Size)))
}

func (f *file) Close() error {
	f.s.locks.release(f)
	if f.h == nil {
		return nil
	}
	h := f.h
	f.h = nil
	err := h.Close()
	if err != nil {
		f.s.clunked(f.path, err)
	}
	return f.s.errno("close", f.path, err)
}

func (f *file) Open(mode p9.OpenFlags) (p9.QID, uint32, error) {
	fi, err := f.s.fsys.Stat(f.path)
	if err != nil {
		return p9.QID{}, 0, f.s.errno("open", f.path, err)
	}
	if fi.IsDir {
		list, err := f.s.fsys.ReadDir(f.path)
		if err != nil {
			return p9.QID{}, 0, f.s.errno("open", f.path, err)
		}
		f.dir, f.isD = list, true
		return f.s.qid(f.path, true), 0, nil
	}
	flag := int(mode.Mode())
	if mode&oTrunc != 0 {
		flag |= os.O_TRUNC
	}
	if flag != os.O_RDONLY {
		if err := f.writeAllowed("open"); err != nil {
			return p9.QID{}, 0, err
		}
	}
	h, err := f.s.fsys.OpenFile(f.path, flag)
	if err != nil {
		return p9.QID{}, 0, f.s.errno("open", f.path, err)
	}
	f.h = h
	return f.s.qid(f.path, false), 0, nil
}

func (f *file) ReadAt(p []byte, off int64) (int, error) {
	if f.h == nil {
		return 0, linux.EISDIR
	}
	n, err := f.h.ReadAt(p, off)
	if err == io.EOF {
		return n, nil // 9P signals the end with a short (or empty) read
	}
	return n, f.s.errno("read", f.path, err)
}

func (f *file) WriteAt(p []byte, off int64) (int, error) {
	if f.h == nil {
		return 0, linux.EISDIR
	}
	n, err := f.h.WriteAt(p, off)
	return n, f.s.errno("write", f.path, err)
}

func (f *file) FSync() error {
	if f.h != nil {
		return f.s.errno("fsync", f.path, f.h.Sync())
	}
	return f.s.errno("fsync", f.path, f.s.fsys.Sync())
}

func (f *file) Create(name string, flags p9.OpenFlags, _ p9.FileMode, _ p9.UID, _ p9.GID) (p9.File, p9.QID, uint32, error) {
	p := f.child(name)
	if err := f.writeAllowed("create"); err != nil {
		return nil, p9.QID{}, 0, err
	}
	// Tlcreate makes a new file: the kernel looks an existing name up
	// first and opens it instead, so an existing name is EEXIST here.
	flag := int(flags.Mode()) | os.O_CREATE | os.O_EXCL
	if flag&(os.O_WRONLY|os.O_RDWR) == 0 {
		flag |= os.O_RDWR // a created file must be writable to the handle that made it
	}
	h, err := f.s.fsys.OpenFile(p, flag)
	if err != nil {
		return nil, p9.QID{}, 0, f.s.errno("create", p, err)
	}
	return &file{s: f.s, path: p, h: h}, f.s.qid(p, false), 0, nil
}

func (f *file) Mkdir(name string, _ p9.FileMode, _ p9.UID, _ p9.GID) (p9.QID, error) {
	p := f.child(name)
	if err := f.writeAllowed("mkdir"); err != nil {
		return p9.QID{}, err
	}
	if _, err := f.s.fsys.Stat(p); err == nil {
		return p9.QID{}, linux.EEXIST
	} else if !errors.Is(err, iofs.ErrNotExist) {
		return p9.QID{}, f.s.errno("mkdir", p, err)
	}
	if err := f.s.fsys.Mkdir(p); err != nil {
		return p9.QID{}, f.s.errno("mkdir", p, err)
	}
	return f.s.qid(p, true), f.changed("mkdir", p)
}

func (f *file) UnlinkAt(name string, flags uint32) error {
	p := f.child(name)
	if err := f.writeAllowed("unlink"); err != nil {
		return err
	}
	fi, err := f.s.fsys.Stat(p)
	if err != nil {
		return f.s.errno("unlink", p, err)
	}
	// unlink(2) of a directory never gets here (the kernel refuses it
	// with EISDIR itself), while Tremove sends flags 0 for directories too
	if flags&atRmdir != 0 && !fi.IsDir {
		return linux.ENOTDIR
	}
	if err := f.s.fsys.Remove(p); err != nil {
		return f.s.errno("unlink", p, err)
	}
	f.s.locks.removed(p)
	return f.changed("unlink", p)
}

func (f *file) RenameAt(oldName string, newDir p9.File, newName string) error {
	nd, ok := newDir.(*file)
	if !ok {
		return linux.EXDEV
	}
	o, n := f.child(oldName), nd.child(newName)
	if err := f.writeAllowed("rename"); err != nil {
		return err
	}
	if err := f.s.fsys.Rename(o, n); err != nil {
		return f.s.errno("rename", o, err)
	}
	f.s.locks.renamed(o, n)
	return nil // Rename syncs
}

func (f *file) Renamed(newDir p9.File, newName string) {
	if nd, ok := newDir.(*file); ok {
		f.path = nd.child(newName)
	}
}

func (f *file) Readdir(offset uint64, count uint32) (p9.Dirents, error) {
	if !f.isD {
		return nil, linux.ENOTDIR
	}
	var out p9.Dirents
	for i := offset; i < uint64(len(f.dir)) && uint32(len(out)) < count; i++ {
		e := f.dir[i]
		q := f.s.qid(f.child(e.Name), e.IsDir)
		out = append(out, p9.Dirent{QID: q, Offset: i + 1, Type: q.Type, Name: e.Name})
	}
	return out, nil
}

func (f *file) StatFS() (p9.FSStat, error) {
	free, err := f.s.fsys.FreeSpace()
	if err != nil {
		return p9.FSStat{}, f.s.errno("statfs", f.path, err)
	}
	const bs = 4096
	return p9.FSStat{Type: 0x01021997, // V9FS_MAGIC
		BlockSize: bs, Blocks: uint64(f.s.fsys.Size()) / bs,
		BlocksFree: uint64(free) / bs, BlocksAvailable: uint64(free) / bs,
		NameLength: 255}, nil
}

func (f *file) Readlink() (string, error) { return "", linux.EINVAL } // there are no symlinks
