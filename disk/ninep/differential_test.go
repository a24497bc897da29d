package ninep_test

import (
	"bufio"
	"bytes"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	mrand "math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"

	"github.com/hugelgupf/p9/linux"
	"github.com/hugelgupf/p9/p9"

	"github.com/keygate/keygate/disk"
	"github.com/keygate/keygate/disk/ninep"
	"github.com/keygate/keygate/internal/testutil"
)

// childEnv carries image:socket:hex-key to the server child of
// TestDifferential.
const childEnv = "KEYGATE_NINEP_TEST_CHILD"

// diffSeeds and diffOps bound TestDifferential: each seed is one run of
// diffOps random operations, the same at every run.
var (
	diffSeeds = []uint64{1, 2, 3, 4}
	diffOps   = 400
)

// TestDifferentialServerChild is the server process TestDifferential
// starts and kills; run directly it does nothing.
func TestDifferentialServerChild(t *testing.T) {
	arg := os.Getenv(childEnv)
	if arg == "" {
		t.Skip("runs only as TestDifferential's child process")
	}
	parts := strings.SplitN(arg, ":", 3)
	kb, err := hex.DecodeString(parts[2])
	if err != nil {
		t.Fatal(err)
	}
	key, err := disk.NewKey(kb)
	if err != nil {
		t.Fatal(err)
	}
	im, err := disk.OpenImage(parts[0], key, true)
	if err != nil {
		t.Fatal(err)
	}
	fsys, err := im.FS()
	if err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("unix", parts[1])
	if err != nil {
		t.Fatal(err)
	}
	fmt.Println("serving")
	t.Fatal(ninep.NewServer(fsys).Serve(l)) // until killed
}

// diffNames are the paths the random operations pick from: files and
// directories at two levels, so that renames cross directories and meet
// files, directories and nothing.
var diffNames = []string{"f0", "f1", "f2", "a", "b", "a/f0", "a/f1", "a/c", "b/f0", "b/f1", "a/c/f0"}

// pair is one file open both ways.
type pair struct {
	nine  p9.File
	plain *os.File
}

// differ runs the same operations on the 9P export and on a plain
// directory and fails at the first answer that differs.
type differ struct {
	t       *testing.T
	rng     *mrand.Rand
	root    p9.File
	dir     string
	open    map[string]*pair
	model   map[string][]byte // file contents as the plain directory has them
	durable map[string][]byte // what each file held at its last fsync or close, while unchanged since
	log     []string
}

// errnoOf reduces an error to its errno, 0 for none.
func errnoOf(err error) uintptr {
	var le linux.Errno
	var se syscall.Errno
	switch {
	case err == nil:
		return 0
	case errors.As(err, &le):
		return uintptr(le)
	case errors.As(err, &se):
		return uintptr(se)
	}
	return 0xFFFF
}

func (d *differ) same(op string, nineErr, plainErr error) bool {
	d.log = append(d.log, fmt.Sprintf("%s: 9p %v, plain %v", op, nineErr, plainErr))
	if a, b := errnoOf(nineErr), errnoOf(plainErr); a != b {
		d.t.Fatalf("%s: 9P says %v, the plain directory %v\nops so far:\n%s", op, nineErr, plainErr, strings.Join(d.log, "\n"))
	}
	return nineErr == nil
}

// walk walks to p; "." is a new fid on the root. It walks as the kernel
// does, one name at a time, and stops with ENOTDIR at a file in the way,
// which a kernel client finds in its own cache without asking.
func (d *differ) walk(p string) (p9.File, error) {
	if p == "." {
		_, f, err := d.root.Walk(nil)
		return f, err
	}
	names := strings.Split(p, "/")
	for i := 1; i < len(names); i++ {
		if _, err := d.walkDir(strings.Join(names[:i], "/"), false); err != nil {
			return nil, err
		}
	}
	_, f, err := d.root.Walk(names)
	return f, err
}

// walkDir walks to the directory p, failing with ENOTDIR at a file. With
// keep false it only checks.
func (d *differ) walkDir(p string, keep bool) (p9.File, error) {
	if p == "." {
		return d.walk(p)
	}
	f, err := d.walk(p)
	if err != nil {
		return nil, err
	}
	qid, _, _, err := f.GetAttr(p9.AttrMask{Mode: true})
	if err == nil && qid.Type&p9.TypeDir == 0 {
		err = linux.ENOTDIR
	}
	if err != nil || !keep {
		f.Close()
		return nil, err
	}
	return f, nil
}

// handle opens p both ways (creating it when create is set).
func (d *differ) handle(p string, create bool) (*pair, bool) {
	if h := d.open[p]; h != nil {
		return h, true
	}
	flag := os.O_RDWR
	if create {
		flag |= os.O_CREATE
	}
	pf, perr := os.OpenFile(filepath.Join(d.dir, p), flag, 0o644)
	var nf p9.File
	f, nerr := d.walk(p)
	if nerr == nil {
		if _, _, nerr = f.Open(p9.ReadWrite); nerr != nil {
			f.Close()
		} else {
			nf = f
		}
	} else if errors.Is(nerr, linux.ENOENT) && create {
		var dir p9.File
		if dir, nerr = d.walkDir(path.Dir(p), true); nerr == nil {
			if nf, _, _, nerr = dir.Create(path.Base(p), p9.ReadWrite, 0o644, p9.NoUID, p9.NoGID); nerr != nil {
				dir.Close()
			}
		}
	}
	if !d.same("open "+p, nerr, perr) {
		if pf != nil {
			pf.Close()
		}
		return nil, false
	}
	if _, ok := d.model[p]; !ok {
		d.model[p] = nil
		d.durable[p] = nil // created: the server synced the new name
	}
	h := &pair{nine: nf, plain: pf}
	d.open[p] = h
	return h, true
}

// closeAll closes every open file; over 9P that stores it durably.
func (d *differ) closeAll() {
	for p, h := range d.open {
		d.same("close "+p, h.nine.Close(), h.plain.Close())
		d.durable[p] = bytes.Clone(d.model[p])
	}
	clear(d.open)
}

func (d *differ) step() {
	p := diffNames[d.rng.IntN(len(diffNames))]
	q := diffNames[d.rng.IntN(len(diffNames))]
	full := filepath.Join(d.dir, p)
	switch op := d.rng.IntN(100); {
	case op < 30: // write, sometimes far past the end, leaving a hole
		h, ok := d.handle(p, true)
		if !ok {
			return
		}
		off := d.rng.Int64N(int64(len(d.model[p])) + 100_000)
		if d.rng.IntN(5) == 0 {
			off += d.rng.Int64N(3 << 20)
		}
		b := make([]byte, 1+d.rng.IntN(90_000))
		for i := range b {
			b[i] = byte(d.rng.Uint32())
		}
		_, perr := h.plain.WriteAt(b, off)
		var nerr error
		for done := 0; done < len(b) && nerr == nil; {
			var n int
			n, nerr = h.nine.WriteAt(b[done:], off+int64(done))
			done += n
		}
		if d.same(fmt.Sprintf("write %s %d+%d", p, off, len(b)), nerr, perr) {
			m := d.model[p]
			if end := int(off) + len(b); end > len(m) {
				m = append(m, make([]byte, end-len(m))...)
			}
			copy(m[off:], b)
			d.model[p] = m
			delete(d.durable, p)
		}
	case op < 45: // read
		h, ok := d.handle(p, false)
		if !ok {
			return
		}
		off, n := d.rng.Int64N(int64(len(d.model[p]))+10), 1+d.rng.IntN(200_000)
		pb, nb := make([]byte, n), make([]byte, n)
		pn, perr := h.plain.ReadAt(pb, off)
		nn, nerr := 0, error(nil)
		for nn < n {
			var k int
			k, nerr = h.nine.ReadAt(nb[nn:], off+int64(nn))
			nn += k
			if k == 0 || nerr != nil {
				break
			}
		}
		if errors.Is(nerr, io.EOF) {
			nerr = nil
		}
		if errors.Is(perr, io.EOF) {
			perr = nil
		}
		d.same(fmt.Sprintf("read %s %d+%d", p, off, n), nerr, perr)
		if !bytes.Equal(pb[:pn], nb[:nn]) {
			d.t.Fatalf("read %s %d+%d: 9P gave %d bytes, the plain directory %d, or other bytes", p, off, n, nn, pn)
		}
	case op < 55: // truncate, shorter or longer
		h, ok := d.handle(p, false)
		if !ok {
			return
		}
		n := d.rng.Int64N(int64(len(d.model[p])) + 200_000)
		if d.same(fmt.Sprintf("truncate %s %d", p, n),
			h.nine.SetAttr(p9.SetAttrMask{Size: true}, p9.SetAttr{Size: uint64(n)}), h.plain.Truncate(n)) {
			m := d.model[p]
			if int(n) <= len(m) {
				m = m[:n]
			} else {
				m = append(m, make([]byte, int(n)-len(m))...)
			}
			d.model[p] = m
			delete(d.durable, p)
		}
	case op < 67: // fsync
		if h := d.open[p]; h != nil {
			if d.same("fsync "+p, h.nine.FSync(), h.plain.Sync()) {
				d.durable[p] = bytes.Clone(d.model[p])
			}
		}
	case op < 72: // stat
		var size uint64
		f, nerr := d.walk(p)
		if nerr == nil {
			_, _, a, err := f.GetAttr(p9.AttrMaskAll)
			nerr, size = err, a.Size
			f.Close()
		}
		fi, perr := os.Stat(full)
		if d.same("stat "+p, nerr, perr) && !fi.IsDir() && size != uint64(fi.Size()) {
			d.t.Fatalf("stat %s: 9P says %d bytes, the plain directory %d", p, size, fi.Size())
		}
	case op < 82: // rename, over whatever is there
		d.closeAll()
		op := fmt.Sprintf("rename %s %s", p, q)
		// the kernel resolves both parents, then the source, before it
		// asks the server
		from, nerr := d.walkDir(path.Dir(p), true)
		var to p9.File
		if nerr == nil {
			if to, nerr = d.walkDir(path.Dir(q), true); nerr != nil {
				from.Close()
			}
		}
		if nerr == nil {
			var src p9.File
			if src, nerr = d.walk(p); nerr == nil {
				src.Close()
				nerr = from.RenameAt(path.Base(p), to, path.Base(q))
			}
			to.Close()
			from.Close()
		}
		// syscall.Rename: os.Rename refuses to replace a directory
		if d.same(op, nerr, syscall.Rename(full, filepath.Join(d.dir, q))) && p != q {
			d.moved(p, q)
		}
	case op < 88: // unlink (a file, or an empty directory: Tremove's flags 0)
		d.closeAll()
		if d.same("unlink "+p, d.unlink(p, 0), os.Remove(full)) {
			d.moved(p, "")
		}
	case op < 91: // rmdir
		d.closeAll()
		if d.same("rmdir "+p, d.unlink(p, 0x200), syscall.Rmdir(full)) {
			d.moved(p, "")
		}
	case op < 96: // mkdir
		var nerr error
		dir, err := d.walkDir(path.Dir(p), true)
		if nerr = err; err == nil {
			_, nerr = dir.Mkdir(path.Base(p), 0o755, p9.NoUID, p9.NoGID)
			dir.Close()
		}
		d.same("mkdir "+p, nerr, os.Mkdir(full, 0o755))
	default: // list a directory
		names := func(ents []os.DirEntry) []string {
			var out []string
			for _, e := range ents {
				out = append(out, e.Name())
			}
			return out
		}
		ents, perr := os.ReadDir(full)
		var got []string
		f, nerr := d.walk(p)
		if nerr == nil {
			if _, _, nerr = f.Open(p9.ReadOnly); nerr == nil {
				ds, err := f.Readdir(0, 4096)
				if nerr = err; err == nil {
					for _, e := range ds {
						got = append(got, e.Name)
					}
				}
			}
			f.Close()
		}
		if errors.Is(perr, syscall.ENOTDIR) {
			return // opendir(2) of a file: the kernel refuses it itself, without asking the server
		}
		slices.Sort(got)
		if d.same("list "+p, nerr, perr) && !slices.Equal(got, names(ents)) {
			d.t.Fatalf("list %s: 9P has %v, the plain directory %v", p, got, names(ents))
		}
	}
}

func (d *differ) unlink(p string, flags uint32) error {
	dir, err := d.walkDir(path.Dir(p), true)
	if err != nil {
		return err
	}
	defer dir.Close()
	return dir.UnlinkAt(path.Base(p), flags)
}

// moved follows a rename of p to q (or a removal, q empty) in the models:
// what was at q is replaced, and Rename stores and syncs what it moves.
func (d *differ) moved(p, q string) {
	under := func(k, p string) bool { return k == p || strings.HasPrefix(k, p+"/") }
	moving := map[string][]byte{}
	for k, v := range d.model {
		if under(k, p) {
			moving[k] = v
			delete(d.model, k)
			delete(d.durable, k)
		}
	}
	if q == "" {
		return
	}
	for k := range d.model {
		if under(k, q) {
			delete(d.model, k)
			delete(d.durable, k)
		}
	}
	for k, v := range moving {
		d.model[q+k[len(p):]] = v
		d.durable[q+k[len(p):]] = bytes.Clone(v)
	}
}

// TestDifferential runs seeded random operations against the 9P export
// of an encrypted ext4 volume, served by a child process, and against a
// plain directory, comparing every answer; then kills the server with
// SIGKILL while some files have unsynced writes, unlocks the volume as
// the next boot would, checks every file whose last change was fsynced
// (or closed, or renamed: both store it) holds exactly that, and runs
// e2fsck -fn.
func TestDifferential(t *testing.T) {
	e2fsck := testutil.LookPath(t, "e2fsck")
	for _, seed := range diffSeeds {
		t.Run(fmt.Sprintf("seed-%d", seed), func(t *testing.T) {
			img := filepath.Join(t.TempDir(), "vol.img")
			kb := make([]byte, 32)
			mrand.NewChaCha8([32]byte{byte(seed)}).Read(kb)
			key, err := disk.NewKey(kb)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(key.Destroy)
			if _, err := disk.CreateImage(img, key, disk.CreateOptions{Size: 64 << 20, FS: disk.Ext4, PBKDF: disk.PBKDF2}); err != nil {
				t.Fatal(err)
			}
			sdir, err := os.MkdirTemp("", "9p")
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { os.RemoveAll(sdir) })
			sock := filepath.Join(sdir, "s")
			cmd := exec.Command(os.Args[0], "-test.run=^TestDifferentialServerChild$", "-test.v")
			cmd.Env = append(os.Environ(), childEnv+"="+img+":"+sock+":"+hex.EncodeToString(kb))
			out, err := cmd.StdoutPipe()
			if err != nil {
				t.Fatal(err)
			}
			cmd.Stderr = os.Stderr
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
			lines := bufio.NewScanner(out)
			for lines.Scan() && !strings.Contains(lines.Text(), "serving") {
			}
			go io.Copy(io.Discard, out)
			root, hangup, err := ninep.Dial(sock)
			if err != nil {
				t.Fatal(err)
			}
			defer hangup()

			d := &differ{t: t, rng: mrand.New(mrand.NewPCG(seed, 11)), root: root, dir: t.TempDir(),
				open: map[string]*pair{}, model: map[string][]byte{}, durable: map[string][]byte{}}
			for _, dir := range []string{"a", "b", "a/c"} {
				f, err := d.walk(path.Dir(dir))
				if err != nil {
					t.Fatal(err)
				}
				_, nerr := f.Mkdir(path.Base(dir), 0o755, p9.NoUID, p9.NoGID)
				f.Close()
				d.same("mkdir "+dir, nerr, os.Mkdir(filepath.Join(d.dir, dir), 0o755))
			}
			for range diffOps {
				d.step()
			}
			// leave some files dirty: written after their last fsync
			for p, h := range d.open {
				if d.rng.IntN(2) == 0 {
					if _, err := h.nine.WriteAt([]byte("unsynced"), 10); err == nil {
						delete(d.durable, p)
					}
				}
			}
			if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
				t.Fatal(err)
			}
			cmd.Wait()

			im, err := disk.OpenImage(img, key, true)
			if err != nil {
				t.Fatalf("unlock after the kill: %v", err)
			}
			defer im.Close()
			fsys, err := im.FS()
			if err != nil {
				t.Fatalf("open the filesystem after the kill: %v", err)
			}
			checked := 0
			for p, want := range d.durable {
				if got := getAll(t, fsys, p); !bytes.Equal(got, want) {
					t.Errorf("%s after the kill: %d bytes, not the %d fsynced", p, len(got), len(want))
				}
				checked++
			}
			t.Logf("%d operations, %d files checked after the kill", len(d.log), checked)
			if err := fsys.Sync(); err != nil {
				t.Fatal(err)
			}
			plainFsck(t, e2fsck, im.Device())
		})
	}
}

// plainFsck runs e2fsck -fn on a decrypted copy of d.
func plainFsck(t *testing.T, e2fsck string, d *disk.Device) {
	t.Helper()
	plain := make([]byte, d.Size())
	if _, err := d.ReadAt(plain, 0); err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(t.TempDir(), "plain.img")
	if err := os.WriteFile(p, plain, 0o600); err != nil {
		t.Fatal(err)
	}
	clear(plain)
	if out, err := exec.Command(e2fsck, "-fn", p).CombinedOutput(); err != nil {
		t.Fatalf("e2fsck -fn after the kill: %v\n%s", err, out)
	}
}
