package ninep

import (
	"path/filepath"
	"strings"
	"testing"

	"github.com/hugelgupf/p9/p9"

	"github.com/keygate/keygate/disk"
)

// TestLocks drives POSIX record locks as Tlock hands them to the file: from
// two fids, as two processes sharing the export would take them. (It calls
// the server's files directly: hugelgupf/p9 v0.3.0's client sends Tlock
// without its fid, so no Go client can send one over the wire.)
func TestLocks(t *testing.T) {
	dir := t.TempDir()
	key, err := disk.NewKey([]byte("0123456789abcdef0123456789abcdef"))
	if err != nil {
		t.Fatal(err)
	}
	defer key.Destroy()
	img := filepath.Join(dir, "vol.img")
	if _, err := disk.CreateImage(img, key, disk.CreateOptions{Size: 64 << 20, FS: disk.Ext4, PBKDF: disk.PBKDF2}); err != nil {
		t.Fatal(err)
	}
	im, err := disk.OpenImage(img, key, true)
	if err != nil {
		t.Fatal(err)
	}
	defer im.Close()
	fsys, err := im.FS()
	if err != nil {
		t.Fatal(err)
	}
	if err := fsys.Put("/db", strings.NewReader("database"), 8); err != nil {
		t.Fatal(err)
	}
	s := NewServer(fsys)
	open := func() p9.File {
		root, err := (&attacher{s: s}).Attach()
		if err != nil {
			t.Fatal(err)
		}
		_, f, err := root.Walk([]string{"db"})
		if err != nil {
			t.Fatal(err)
		}
		if _, _, err := f.Open(p9.ReadWrite); err != nil {
			t.Fatal(err)
		}
		return f
	}
	a, b := open(), open()
	const pidA, pidB = 100, 200
	type step struct {
		name          string
		f             p9.File
		pid           int
		typ           p9.LockType
		start, length uint64
		want          p9.LockStatus
	}
	steps := []step{
		{"A write-locks [0,100)", a, pidA, p9.WriteLock, 0, 100, p9.LockStatusOK},
		{"B cannot read-lock inside it", b, pidB, p9.ReadLock, 50, 10, p9.LockStatusBlocked},
		{"B read-locks after it", b, pidB, p9.ReadLock, 100, 100, p9.LockStatusOK},
		{"A may read-lock B's read range too", a, pidA, p9.ReadLock, 150, 10, p9.LockStatusOK},
		{"A cannot write-lock B's read range", a, pidA, p9.WriteLock, 120, 1, p9.LockStatusBlocked},
		{"A converts its own range to a read lock", a, pidA, p9.ReadLock, 0, 50, p9.LockStatusOK},
		{"B may now read-lock [0,50)", b, pidB, p9.ReadLock, 10, 10, p9.LockStatusOK},
		{"but not write-lock A's remaining write lock", b, pidB, p9.WriteLock, 60, 1, p9.LockStatusBlocked},
		{"A unlocks [50,100)", a, pidA, p9.Unlock, 50, 50, p9.LockStatusOK},
		{"B write-locks there", b, pidB, p9.WriteLock, 60, 1, p9.LockStatusOK},
		{"a whole-file lock (length 0) conflicts with everything", a, pidA, p9.WriteLock, 0, 0, p9.LockStatusBlocked},
	}
	for _, s := range steps {
		client := "guestA"
		if s.f == b {
			client = "guestB"
		}
		got, err := s.f.Lock(s.pid, s.typ, 0, s.start, s.length, client)
		if err != nil || got != s.want {
			t.Fatalf("%s: status %v (%v), want %v", s.name, got, err, s.want)
		}
	}
	// The owner is the pair (client, pid): guest B's pid 100 is not guest
	// A's, so it conflicts with A's read lock on [0,50).
	if got, _ := b.Lock(pidA, p9.WriteLock, 0, 0, 10, "guestB"); got != p9.LockStatusBlocked {
		t.Fatalf("another client's same pid took a write lock over A's read lock: %v", got)
	}
	for _, s := range []step{
		{"the owner's own unlock by another fid works", b, pidA, p9.Unlock, 0, 0, p9.LockStatusOK},
	} {
		got, err := s.f.Lock(s.pid, s.typ, 0, s.start, s.length, "guestA")
		if err != nil || got != s.want {
			t.Fatalf("%s: status %v (%v), want %v", s.name, got, err, s.want)
		}
	}
	// Closing B's fid releases every lock taken through it.
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	if got, err := a.Lock(pidA, p9.WriteLock, 0, 0, 0, ""); err != nil || got != p9.LockStatusOK {
		t.Fatalf("after B's close, A's whole-file write lock: %v (%v), want OK", got, err)
	}

	// Locks follow the file through a rename; a new file under the old
	// name has none.
	root, err := (&attacher{s: s}).Attach()
	if err != nil {
		t.Fatal(err)
	}
	if err := root.RenameAt("db", root, "db2"); err != nil {
		t.Fatal(err)
	}
	a.Renamed(root, "db2") // as the p9 server tells every fid of the file
	if err := fsys.Put("/db", strings.NewReader("new"), 3); err != nil {
		t.Fatal(err)
	}
	c := open()
	if got, _ := c.Lock(300, p9.WriteLock, 0, 0, 0, "guestC"); got != p9.LockStatusOK {
		t.Fatalf("a new file under the renamed one's name inherited its locks: %v", got)
	}
	_, moved, err := root.Walk([]string{"db2"})
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := moved.Open(p9.ReadWrite); err != nil {
		t.Fatal(err)
	}
	if got, _ := moved.Lock(300, p9.ReadLock, 0, 0, 10, "guestC"); got != p9.LockStatusBlocked {
		t.Fatalf("A's write lock did not follow the file to its new name: %v", got)
	}
	if err := a.Close(); err != nil { // A's fid, renamed: its clunk still releases
		t.Fatal(err)
	}
	if got, _ := moved.Lock(300, p9.ReadLock, 0, 0, 10, "guestC"); got != p9.LockStatusOK {
		t.Fatalf("after A's close, its lock on the renamed file remains: %v", got)
	}
}
