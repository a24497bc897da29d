package disk_test

import (
	"bytes"
	"fmt"
	"log"
	"os"
	"path/filepath"
	"strings"

	"github.com/keygate/keygate/disk"
)

// Create an encrypted image with ext4 inside, write a file, and read it back
// in a later session with the same key.
func Example() {
	dir, _ := os.MkdirTemp("", "keygate-example-")
	defer os.RemoveAll(dir)
	img := filepath.Join(dir, "vol.img")
	key, err := disk.NewKey([]byte("a high-entropy key, in practice 32 random bytes"))
	if err != nil {
		log.Fatal(err)
	}
	defer key.Destroy()

	res, err := disk.CreateImage(img, key, disk.CreateOptions{Size: 32 << 20, FS: disk.Ext4, PBKDF: disk.PBKDF2})
	if err != nil {
		log.Fatal(err)
	}
	res.Wipe()

	im, err := disk.OpenImage(img, key, true)
	if err != nil {
		log.Fatal(err)
	}
	fsys, err := im.FS()
	if err != nil {
		log.Fatal(err)
	}
	if err := fsys.Put("/hello.txt", strings.NewReader("hello\n"), 6); err != nil {
		log.Fatal(err)
	}
	if err := im.Close(); err != nil {
		log.Fatal(err)
	}

	im, err = disk.OpenImage(img, key, false)
	if err != nil {
		log.Fatal(err)
	}
	defer im.Close()
	fsys, _ = im.FS()
	var out bytes.Buffer
	if _, err := fsys.Get("/hello.txt", &out); err != nil {
		log.Fatal(err)
	}
	fmt.Print(out.String())
	// Output: hello
}
