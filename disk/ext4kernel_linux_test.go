package disk_test

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/keygate/keygate/disk"
	"github.com/keygate/keygate/internal/testutil"
)

// TestMkfsExt4KernelMount hands the Linux kernel what it would see through
// keygate's NBD export: the plaintext of a fresh encrypted volume, garbage
// in every block mkfs did not write, after keygate wrote a file spilling
// into a lazily initialised group. The kernel mounts it, reads keygate's
// file, writes its own across groups (and its lazyinit thread zeroes inode
// tables meanwhile); e2fsck is clean after, and keygate reads the kernel's
// file back.
func TestMkfsExt4KernelMount(t *testing.T) {
	testutil.Root(t)
	mount, e2fsck := testutil.LookPath(t, "mount"), testutil.LookPath(t, "e2fsck")
	if _, err := os.Stat("/dev/loop-control"); err != nil {
		testutil.Skip(t, "loop", "no /dev/loop-control: "+err.Error())
	}
	const size = 1 << 30
	img := newImage(t, size)
	_, c := newKey(t)
	d := newDevice(t, img, size, 4096, c)
	fsys, err := disk.Mkfs(d, disk.Ext4, "KERNEL")
	if err != nil {
		t.Fatal(err)
	}
	ours := randBytes(150 << 20) // more than group 0 holds
	put(t, fsys, "/ours", ours)
	if err := fsys.Sync(); err != nil {
		t.Fatal(err)
	}

	dir := t.TempDir()
	plainPath := filepath.Join(dir, "plain.img")
	plain, err := os.Create(plainPath)
	if err != nil {
		t.Fatal(err)
	}
	defer plain.Close()
	buf := make([]byte, 4<<20)
	for off := int64(0); off < size; off += int64(len(buf)) {
		if _, err := d.ReadAt(buf, off); err != nil {
			t.Fatal(err)
		}
		if _, err := plain.WriteAt(buf, off); err != nil {
			t.Fatal(err)
		}
	}
	mnt := filepath.Join(dir, "mnt")
	if err := os.Mkdir(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command(mount, "-o", "loop", plainPath, mnt).CombinedOutput(); err != nil {
		testutil.Skip(t, "loop", "mount -o loop: "+string(out))
	}
	mounted := true
	umount := func() {
		if mounted {
			if out, err := exec.Command("umount", mnt).CombinedOutput(); err != nil {
				t.Errorf("umount: %v\n%s", err, out)
			}
			mounted = false
		}
	}
	t.Cleanup(umount)
	got, err := os.ReadFile(filepath.Join(mnt, "ours"))
	if err != nil || !bytes.Equal(got, ours) {
		t.Fatalf("the kernel reads keygate's file wrong (%d bytes, %v)", len(got), err)
	}
	theirs := randBytes(200 << 20)
	if err := os.WriteFile(filepath.Join(mnt, "theirs"), theirs, 0o644); err != nil {
		t.Fatal(err)
	}
	umount()
	if out, err := exec.Command(e2fsck, "-fn", plainPath).CombinedOutput(); err != nil {
		t.Fatalf("e2fsck -fn after the kernel wrote: %v\n%s", err, out)
	}

	pd, err := disk.NewDevice(plain, 0, size, 4096, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer pd.Close()
	pfs, err := disk.OpenFS(pd)
	if err != nil {
		t.Fatal(err)
	}
	if got := get(t, pfs, "/theirs"); !bytes.Equal(got, theirs) {
		t.Error("keygate reads the kernel's file wrong")
	}
}
