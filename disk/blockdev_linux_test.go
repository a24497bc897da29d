package disk_test

import (
	"bytes"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/keygate/keygate/disk"
	"github.com/keygate/keygate/internal/testutil"
)

// TestOpenBlockDevice opens a volume through a loop device, the way a VM
// opens /dev/vdb: a block device's Stat size is 0, so the data segment's
// size must come from the device itself.
func TestOpenBlockDevice(t *testing.T) {
	testutil.Root(t)
	losetup := testutil.LookPath(t, "losetup")
	img := filepath.Join(t.TempDir(), "vol.img")
	key, err := disk.NewKey([]byte("block device key"))
	if err != nil {
		t.Fatal(err)
	}
	defer key.Destroy()
	res, err := disk.CreateImage(img, key, disk.CreateOptions{Size: 32 << 20, FS: disk.Ext4, PBKDF: disk.PBKDF2})
	if err != nil {
		t.Fatal(err)
	}
	res.Wipe()
	out, err := exec.Command(losetup, "--find", "--show", img).CombinedOutput()
	if err != nil {
		testutil.Skip(t, "loop", "losetup could not attach a loop device: "+strings.TrimSpace(string(out)))
	}
	dev := strings.TrimSpace(string(out))
	t.Cleanup(func() { _ = exec.Command(losetup, "-d", dev).Run() })

	im, err := disk.OpenImage(dev, key, true)
	if err != nil {
		t.Fatalf("OpenImage(%s): %v", dev, err)
	}
	if got, want := im.Device().Size(), res.Info.DataSize; got != want || want <= 0 {
		t.Errorf("data segment on %s is %d bytes, want %d", dev, got, want)
	}
	fsys, err := im.FS()
	if err != nil {
		t.Fatal(err)
	}
	data := []byte("written through a block device")
	if err := fsys.Put("/f", bytes.NewReader(data), int64(len(data))); err != nil {
		t.Fatal(err)
	}
	if err := im.Close(); err != nil {
		t.Fatal(err)
	}

	// The same bytes through the image file.
	im, err = disk.OpenImage(img, key, false)
	if err != nil {
		t.Fatal(err)
	}
	defer im.Close()
	fsys, err = im.FS()
	if err != nil {
		t.Fatal(err)
	}
	var got bytes.Buffer
	if _, err := fsys.Get("/f", &got); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got.Bytes(), data) {
		t.Errorf("read back %q, want %q", got.Bytes(), data)
	}
}
