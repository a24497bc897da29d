package disk

import (
	"fmt"
	"io"
	"os"
)

// Reader reads one file of an FS at any offset.
type Reader struct {
	size int64
	r    io.ReaderAt
}

// Size is the file's length.
func (r *Reader) Size() int64 { return r.size }

// ReadAt reads len(p) bytes at off, or fewer with io.EOF at the end.
func (r *Reader) ReadAt(p []byte, off int64) (int, error) { return r.r.ReadAt(p, off) }

// Open opens the file at p for reading. A Reader is safe for concurrent
// use; it must not be used once its file is removed or replaced, as the
// blocks it points at may then hold other data. Get serialises nothing
// more than Open does, so the same holds for a Get racing a Put or Remove
// of the same path.
func (f *FS) Open(p string) (*Reader, error) {
	f.lock()
	defer f.mu.Unlock()
	return f.open(clean(p))
}

func (f *FS) open(p string) (*Reader, error) {
	fi, err := f.stat(p)
	if err != nil {
		return nil, err
	}
	if fi.IsDir {
		return nil, fmt.Errorf("%s is a directory, not a file", display(p))
	}
	if f.typ == Ext4 {
		ino, err := f.inodeOf(p)
		if err != nil {
			return nil, err
		}
		in, err := f.ext.readInode(ino)
		if err != nil {
			return nil, err
		}
		ext, _, err := f.ext.extents(in)
		if err != nil {
			return nil, fmt.Errorf("open %s: inode %d: %w", display(p), ino, err)
		}
		return &Reader{size: fi.Size, r: &extentReader{dev: f.dev, bs: f.ext.bs, size: fi.Size, ext: ext}}, nil
	}
	fl, err := f.fs.OpenFile(p, os.O_RDONLY)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", display(p), err)
	}
	return &Reader{size: fi.Size, r: &fatReader{fs: f, f: fl, size: fi.Size}}, nil
}

// fatReader serialises go-diskfs FAT file reads with the FS lock.
type fatReader struct {
	fs   *FS
	f    io.ReadSeeker
	size int64
}

func (r *fatReader) ReadAt(p []byte, off int64) (int, error) {
	if off >= r.size {
		return 0, io.EOF
	}
	var eof error
	if int64(len(p)) > r.size-off {
		p, eof = p[:r.size-off], io.EOF
	}
	// go-diskfs is not safe for concurrent use; FS never reads a FAT file
	// while holding its own lock
	r.fs.mu.Lock()
	defer r.fs.mu.Unlock()
	if _, err := r.f.Seek(off, io.SeekStart); err != nil {
		return 0, err
	}
	n, err := io.ReadFull(r.f, p)
	if err == io.ErrUnexpectedEOF || err == io.EOF {
		err = nil
	}
	if err == nil {
		err = eof
	}
	return n, err
}

// extentReader reads an ext4 file's data straight from its extents, at
// any offset (go-diskfs's File.Read panics on some unaligned ones, #429).
type extentReader struct {
	dev  *Device
	bs   int64
	size int64
	ext  []extent
}

func (r *extentReader) Size() int64 { return r.size }

func (r *extentReader) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("read at %d: negative offset", off)
	}
	if off >= r.size {
		return 0, io.EOF
	}
	var eof error
	if int64(len(p)) > r.size-off {
		p, eof = p[:r.size-off], io.EOF
	}
	n := 0
	for n < len(p) {
		pos := off + int64(n)
		blk := uint64(pos / r.bs)
		var e *extent
		for i := range r.ext { // few extents; a linear scan is fine
			if blk >= r.ext[i].logical && blk < r.ext[i].logical+uint64(r.ext[i].count) {
				e = &r.ext[i]
				break
			}
		}
		var m int
		if e == nil || e.unwritten {
			// a hole or an unwritten extent reads as zeros, up to the next extent
			end := r.size
			for i := range r.ext {
				if s := int64(r.ext[i].logical) * r.bs; s > pos && s < end {
					end = s
				}
			}
			m = int(min(int64(len(p)-n), end-pos))
			if e != nil {
				m = int(min(int64(m), int64(e.logical+uint64(e.count))*r.bs-pos))
			}
			clear(p[n : n+m])
		} else {
			endOfExt := int64(e.logical+uint64(e.count)) * r.bs
			m = int(min(int64(len(p)-n), endOfExt-pos))
			disk := int64(e.phys)*r.bs + (pos - int64(e.logical)*r.bs)
			if _, err := r.dev.ReadAt(p[n:n+m], disk); err != nil {
				return n, fmt.Errorf("read file data: %w", err)
			}
		}
		n += m
	}
	return n, eof
}
