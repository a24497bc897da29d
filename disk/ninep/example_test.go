package ninep_test

import (
	"fmt"
	"log"
	"net"
	"os"
	"path/filepath"

	"github.com/hugelgupf/p9/p9"

	"github.com/keygate/keygate/disk"
	"github.com/keygate/keygate/disk/ninep"
)

// Serve an unlocked image on a unix socket, write a file through a 9P
// client, and stop the server, which stores what the client wrote.
func ExampleNewServer() {
	dir, _ := os.MkdirTemp("", "ninep-example-")
	defer os.RemoveAll(dir)
	img := filepath.Join(dir, "vol.img")
	key, err := disk.NewKey([]byte("a high-entropy key, in practice 32 random bytes"))
	if err != nil {
		log.Fatal(err)
	}
	defer key.Destroy()
	if _, err := disk.CreateImage(img, key, disk.CreateOptions{Size: 32 << 20, FS: disk.Ext4, PBKDF: disk.PBKDF2}); err != nil {
		log.Fatal(err)
	}
	im, err := disk.OpenImage(img, key, true)
	if err != nil {
		log.Fatal(err)
	}
	defer im.Close()
	fsys, err := im.FS()
	if err != nil {
		log.Fatal(err)
	}

	sock := filepath.Join(dir, "9p.sock")
	l, err := net.Listen("unix", sock) // mount -t 9p -o trans=unix,version=9p2000.L sock /mnt
	if err != nil {
		log.Fatal(err)
	}
	srv := ninep.NewServer(fsys)
	go srv.Serve(l)

	conn, err := net.Dial("unix", sock)
	if err != nil {
		log.Fatal(err)
	}
	c, err := p9.NewClient(conn)
	if err != nil {
		log.Fatal(err)
	}
	root, err := c.Attach("/")
	if err != nil {
		log.Fatal(err)
	}
	_, dirFid, err := root.Walk(nil) // Create turns this fid into the new file
	if err != nil {
		log.Fatal(err)
	}
	f, _, _, err := dirFid.Create("hello.txt", p9.WriteOnly, 0o644, p9.NoUID, p9.NoGID)
	if err != nil {
		log.Fatal(err)
	}
	if _, err := f.WriteAt([]byte("hello over 9P\n"), 0); err != nil {
		log.Fatal(err)
	}
	if err := f.Close(); err != nil { // the clunk stores the file
		log.Fatal(err)
	}
	c.Close()
	if err := srv.Close(); err != nil {
		log.Fatal(err)
	}

	fi, err := fsys.Stat("/hello.txt")
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(fi.Name, fi.Size)
	// Output: hello.txt 14
}
