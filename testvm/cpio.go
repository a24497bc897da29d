package testvm

import (
	"bufio"
	"fmt"
	"io"
	"path"
	"strings"
)

// cpioWriter writes a cpio archive in the "newc" format the kernel unpacks
// into its initramfs. Every field that could vary between builds (mtime,
// owner, inode numbers) is fixed or sequential, so the same inputs give the
// same bytes and therefore the same PCR measurement of the initrd.
type cpioWriter struct {
	w    *bufio.Writer
	n    int64 // bytes written, for padding
	ino  uint32
	seen map[string]bool
	err  error
}

func newCPIOWriter(w io.Writer) *cpioWriter {
	return &cpioWriter{w: bufio.NewWriterSize(w, 1<<20), ino: 1, seen: map[string]bool{}}
}

// File mode type bits, as in stat(2).
const (
	modeDir  = 0o040000
	modeReg  = 0o100000
	modeLink = 0o120000
	modeChr  = 0o020000
)

func (c *cpioWriter) write(b []byte) {
	if c.err != nil {
		return
	}
	n, err := c.w.Write(b)
	c.n += int64(n)
	c.err = err
}

func (c *cpioWriter) pad() {
	if r := c.n % 4; r != 0 {
		c.write(make([]byte, 4-r))
	}
}

// entry writes one header, its name and its data. Names are relative
// ("bin/busybox"), as the kernel's own gen_init_cpio writes them.
func (c *cpioWriter) entry(name string, mode uint32, rdevMajor, rdevMinor uint32, data []byte) error {
	name = strings.TrimPrefix(path.Clean("/"+name), "/")
	if name == "" {
		return fmt.Errorf("cpio: empty entry name")
	}
	if c.seen[name] {
		return fmt.Errorf("cpio: duplicate entry %s", name)
	}
	c.seen[name] = true
	c.header(name, mode, rdevMajor, rdevMinor, len(data))
	c.write(data)
	c.pad()
	return c.err
}

func (c *cpioWriter) header(name string, mode, rdevMajor, rdevMinor uint32, size int) {
	nlink := 1
	if mode&0o170000 == modeDir {
		nlink = 2
	}
	ino := c.ino
	c.ino++
	// magic, ino, mode, uid, gid, nlink, mtime, filesize, devmajor,
	// devminor, rdevmajor, rdevminor, namesize, check
	h := fmt.Sprintf("070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X",
		ino, mode, 0, 0, nlink, 0, size, 0, 0, rdevMajor, rdevMinor, len(name)+1, 0)
	c.write([]byte(h))
	c.write([]byte(name))
	c.write([]byte{0})
	c.pad()
}

// Dir adds a directory.
func (c *cpioWriter) Dir(name string, perm uint32) error {
	return c.entry(name, modeDir|perm, 0, 0, nil)
}

// File adds a regular file.
func (c *cpioWriter) File(name string, perm uint32, data []byte) error {
	return c.entry(name, modeReg|perm, 0, 0, data)
}

// Symlink adds a symbolic link to target.
func (c *cpioWriter) Symlink(name, target string) error {
	return c.entry(name, modeLink|0o777, 0, 0, []byte(target))
}

// CharDev adds a character device node. The archive needs no privileges
// to hold one; the kernel creates it while unpacking.
func (c *cpioWriter) CharDev(name string, perm, major, minor uint32) error {
	return c.entry(name, modeChr|perm, major, minor, nil)
}

// Close writes the trailer and flushes. It does not close the underlying
// writer.
func (c *cpioWriter) Close() error {
	c.header("TRAILER!!!", 0, 0, 0, 0)
	c.pad()
	if c.err != nil {
		return c.err
	}
	return c.w.Flush()
}
