package disk_test

import (
	"errors"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/keygate/keygate/disk"
	"github.com/keygate/keygate/internal/memscan"
	"github.com/keygate/keygate/internal/testutil"
)

// hangGuard bounds how long the test waits for something that must not
// hang; it detects a deadlock and measures nothing.
const hangGuard = 30 * time.Second

// TestWipeWhileDiskHangs wipes a volume's keys while a read of it is
// still waiting in the kernel, as a read of a network disk that stopped
// answering does. The read's buffer is registered with userfaultfd, so
// its pread blocks in the kernel, copying out the data, until the test
// lets it go. The wipe must not wait for it: the volume key must be gone
// from the process's memory while the read still waits, and that read,
// once released, and every later request must fail with ErrKeyWiped
// rather than use freed key pages. Before the wipe the same scan finds
// the key, so the scan can fail.
func TestWipeWhileDiskHangs(t *testing.T) {
	cryptsetup := testutil.LookPath(t, "cryptsetup")
	dir := t.TempDir()
	keyFile, img := filepath.Join(dir, "key"), filepath.Join(dir, "vol.img")
	if err := os.WriteFile(keyFile, []byte("a key for a disk that hangs"), 0o600); err != nil {
		t.Fatal(err)
	}
	key, err := disk.ReadKeyFile(keyFile)
	if err != nil {
		t.Fatal(err)
	}
	defer key.Destroy()
	res, err := disk.CreateImage(img, key, disk.CreateOptions{Size: 32 << 20, FS: disk.Ext4, PBKDF: disk.PBKDF2})
	if err != nil {
		t.Fatal(err)
	}
	res.Wipe()
	vk := dumpVolumeKey(t, cryptsetup, keyFile, img)
	needles := vk.Chunks(16) // the schedule's first round keys are the key's two halves

	im, err := disk.OpenImage(img, key, true)
	if err != nil {
		t.Fatal(err)
	}
	closed := false
	defer func() {
		if !closed {
			im.Close()
		}
	}()
	blocks := im.Blocks()
	buf, release := stalledBuffer(t, 1<<20)
	skip := memscan.RangeOf(buf) // reading it would stall the scan too
	if res := scan(t, needles, skip); len(res.Hits) == 0 {
		t.Fatal("before the wipe the scan finds no copy of the volume key, so it could not see one left behind")
	}

	read := make(chan error, 1)
	go func() {
		_, err := blocks.ReadAt(buf, 0)
		read <- err
	}()
	select {
	case err := <-read:
		t.Fatalf("the read did not wait (returned %v), so this test cannot show a wipe that does not wait", err)
	case <-time.After(500 * time.Millisecond):
	}

	wiped := make(chan error, 1)
	go func() { wiped <- im.Wipe() }()
	select {
	case err := <-wiped:
		if err != nil {
			t.Fatalf("Wipe: %v", err)
		}
	case <-time.After(hangGuard):
		release()
		t.Fatal("Wipe waited for the stalled read")
	}
	select {
	case err := <-read:
		t.Fatalf("the read returned (%v) before it was let go", err)
	default:
	}
	for _, h := range scan(t, needles, skip).Hits {
		t.Errorf("after the wipe, with the read still waiting: key material left in memory: %v", h)
	}

	// New requests fail at once: encryption comes before the write.
	if _, err := blocks.WriteAt(make([]byte, 4096), 0); !errors.Is(err, disk.ErrKeyWiped) {
		t.Errorf("WriteAt after Wipe: %v, want ErrKeyWiped", err)
	}
	release()
	select {
	case err := <-read:
		if !errors.Is(err, disk.ErrKeyWiped) {
			t.Errorf("the read that waited through the wipe returned %v, want ErrKeyWiped", err)
		}
	case <-time.After(hangGuard):
		t.Fatal("the read still waits after it was let go")
	}
	closed = true
	if err := im.Close(); err != nil {
		t.Errorf("Close after Wipe: %v", err)
	}
}

// stalledBuffer returns n bytes of fresh anonymous memory registered with
// userfaultfd for missing pages, and never served: a read(2) into it waits
// in the kernel until release closes the userfaultfd (which is registered
// by then as a cleanup too), after which the pages fill as usual.
func stalledBuffer(t *testing.T, n int) ([]byte, func()) {
	t.Helper()
	fd, _, errno := unix.Syscall(unix.SYS_USERFAULTFD, unix.O_CLOEXEC|unix.O_NONBLOCK, 0, 0)
	if errno != 0 {
		testutil.Skip(t, "userfaultfd", "userfaultfd(2), which this test stalls a read with: "+errno.Error())
	}
	var once sync.Once
	release := func() { once.Do(func() { unix.Close(int(fd)) }) }
	t.Cleanup(release)
	ioctl := func(req uintptr, arg unsafe.Pointer) {
		t.Helper()
		if _, _, errno := unix.Syscall(unix.SYS_IOCTL, fd, req, uintptr(arg)); errno != 0 {
			t.Fatalf("userfaultfd ioctl %#x: %v", req, errno)
		}
	}
	// UFFDIO_API and UFFDIO_REGISTER, as <linux/userfaultfd.h> numbers them.
	api := struct{ api, features, ioctls uint64 }{api: 0xAA}
	ioctl(0xC018AA3F, unsafe.Pointer(&api))
	buf, err := unix.Mmap(-1, 0, n, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { release(); unix.Munmap(buf) })
	reg := struct{ start, len, mode, ioctls uint64 }{
		start: uint64(uintptr(unsafe.Pointer(&buf[0]))), len: uint64(n), mode: 1, // MISSING
	}
	ioctl(0xC020AA00, unsafe.Pointer(&reg))
	return buf, release
}
