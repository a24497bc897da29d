package disk

// This file holds Rename: on ext4 keygate's own (ext4rename.go), on FAT
// go-diskfs's within one directory, and a copy across FAT directories.

import (
	"fmt"
	"io"
	"path"
	"strings"
)

// Rename moves the file or directory oldp to newp, replacing a file (or
// an empty directory, when moving a directory) already there, as
// rename(2) does.
//
// On ext4 the directory entry moves (ext4rename.go): a crash at any point
// leaves newp as it was before or naming the moved file, complete.
// go-diskfs renames only within one FAT directory. Across FAT directories
// a file is copied to newp (with Put's replace when newp exists) and then
// oldp is removed; a crash in between leaves both names, with the
// complete content, never neither. An empty FAT directory is made anew and
// the old one removed. A non-empty one cannot be moved that way and fails
// with ErrCannotMove, which a 9P server reports as EXDEV so that mv falls
// back to copying.
func (f *FS) Rename(oldp, newp string) error {
	f.lock()
	defer f.mu.Unlock()
	o, n := clean(oldp), clean(newp)
	if f.dev.readOnly {
		return fmt.Errorf("rename %s: %w", display(o), ErrReadOnly)
	}
	if o == "." || n == "." {
		return fmt.Errorf("rename %s to %s: the root cannot move or be replaced: %w", display(o), display(n), ErrInvalid)
	}
	oi, err := f.stat(o)
	if err != nil {
		return fmt.Errorf("rename: %w", err)
	}
	if err := f.mustBeDir(path.Dir(n)); err != nil {
		return fmt.Errorf("rename %s: %w", display(o), err)
	}
	if f.fileKey(o) == f.fileKey(n) {
		return nil // the same file (FAT names ignore case)
	}
	if strings.HasPrefix(f.fileKey(o), f.fileKey(n)+"/") {
		// n holds o: as rename(2), which finds this before anything else
		return fmt.Errorf("rename %s over %s, which holds it: %w", display(o), display(n), ErrNotEmpty)
	}
	if oi.IsDir && strings.HasPrefix(f.fileKey(n), f.fileKey(o)+"/") {
		return fmt.Errorf("rename %s to %s: a directory cannot move into itself: %w", display(o), display(n), ErrInvalid)
	}
	ni, err := f.stat(n)
	exists := err == nil
	if exists {
		switch {
		case oi.IsDir && !ni.IsDir:
			return fmt.Errorf("rename %s: %s is a file: %w", display(o), display(n), ErrNotDir)
		case !oi.IsDir && ni.IsDir:
			return fmt.Errorf("rename %s: %s: %w", display(o), display(n), ErrIsDir)
		case ni.IsDir:
			if empty, err := f.dirEmpty(n); err != nil {
				return err
			} else if !empty {
				return fmt.Errorf("rename %s: %s: %w", display(o), display(n), ErrNotEmpty)
			}
		}
	}
	// open files below o must be on disk before their blocks are copied
	// or their directory entry moves
	moved := f.openUnder(o)
	for _, of := range moved {
		if err := of.flush(); err != nil {
			return fmt.Errorf("rename %s: %w", display(o), err)
		}
	}
	switch {
	case f.typ == Ext4:
		f.detach(n)
		if err := f.renameExt4(o, n, oi.IsDir); err != nil {
			return err
		}
	case path.Dir(o) == path.Dir(n):
		if exists {
			f.detach(n)
			if err := f.remove(n, ni.IsDir); err != nil {
				return fmt.Errorf("rename %s: %w", display(o), err)
			}
		}
		if err := f.fs.Rename(o, n); err != nil {
			return fmt.Errorf("rename %s to %s: %w", display(o), display(n), err)
		}
	case !oi.IsDir:
		f.detach(n)
		r, err := f.openUnlocked(o)
		if err != nil {
			return fmt.Errorf("rename %s: %w", display(o), err)
		}
		if err := f.put(n, io.NewSectionReader(r, 0, oi.Size), oi.Size); err != nil {
			return fmt.Errorf("rename %s: copy: %w", display(o), err)
		}
		if err := f.remove(o, false); err != nil {
			return fmt.Errorf("rename %s: %s is complete; removing the old name failed: %w", display(o), display(n), err)
		}
	default:
		if empty, err := f.dirEmpty(o); err != nil {
			return err
		} else if !empty {
			return fmt.Errorf("rename %s to %s: %w", display(o), display(n), ErrCannotMove)
		}
		if exists {
			if err := f.remove(n, true); err != nil {
				return fmt.Errorf("rename %s: %w", display(o), err)
			}
		}
		if err := f.mkdir(n); err != nil {
			return fmt.Errorf("rename %s: %w", display(o), err)
		}
		if err := f.remove(o, true); err != nil {
			return fmt.Errorf("rename %s: %s is made; removing the old directory failed: %w", display(o), display(n), err)
		}
	}
	for _, of := range moved {
		delete(f.files, f.fileKey(of.path))
		of.path = n + of.path[len(o):] // of.path may differ from o in case on FAT
		f.files[f.fileKey(of.path)] = of
		if err := of.reopen(); err != nil {
			return fmt.Errorf("rename %s: reopen %s: %w", display(o), display(of.path), err)
		}
	}
	return f.sync()
}

func (f *FS) emptyFAT(p string) bool {
	fi, err := f.stat(p)
	return err == nil && !fi.IsDir && fi.Size == 0
}

// openUnder lists the open files at p or below it.
func (f *FS) openUnder(p string) []*openFile {
	k := f.fileKey(p)
	var out []*openFile
	for key, of := range f.files {
		if key == k || strings.HasPrefix(key, k+"/") {
			out = append(out, of)
		}
	}
	return out
}

func (f *FS) dirEmpty(p string) (bool, error) {
	entries, err := f.fs.ReadDir(p)
	if err != nil {
		return false, fmt.Errorf("read directory %s: %w", display(p), err)
	}
	for _, e := range entries {
		if e.Name() != "." && e.Name() != ".." && e.Name() != "" {
			return false, nil
		}
	}
	return true, nil
}
