package nbd_test

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/keygate/keygate/disk"
	"github.com/keygate/keygate/disk/nbd"
	"github.com/keygate/keygate/internal/testutil"
	"github.com/keygate/keygate/internal/unixsock"
)

// fileBackend serves a plain file: the unencrypted reference, and a
// backend whose content a test can read directly.
type fileBackend struct {
	*os.File
	size int64
}

func (f fileBackend) Size() int64 { return f.size }

func newFileBackend(t testing.TB, size int64) fileBackend {
	t.Helper()
	f, err := os.Create(filepath.Join(t.TempDir(), "plain.raw"))
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return fileBackend{f, size}
}

// serve starts a server for b on a private socket and returns its URI.
func serve(t testing.TB, b nbd.Backend, o nbd.Options) (*nbd.Server, string) {
	t.Helper()
	sock := filepath.Join(testutil.ShortTempDir(t), "s")
	ln, err := unixsock.Listen(sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := nbd.NewServer(b, o)
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ln) }()
	t.Cleanup(func() {
		srv.Close()
		if err := <-done; err != nbd.ErrServerClosed {
			t.Errorf("Serve returned %v, want ErrServerClosed", err)
		}
	})
	return srv, sock
}

func uri(sock string) string { return "nbd+unix:///?socket=" + sock }

// encrypted makes a keygate volume (no filesystem) and returns its image
// path, key file and the unlocked Image.
func encrypted(t testing.TB, size int64, sectorSize int) (string, string, *disk.Image) {
	t.Helper()
	dir := t.TempDir()
	keyFile := filepath.Join(dir, "vol.key")
	if err := os.WriteFile(keyFile, randBytes(t, 32), 0o600); err != nil {
		t.Fatal(err)
	}
	key, err := disk.ReadKeyFile(keyFile)
	if err != nil {
		t.Fatal(err)
	}
	defer key.Destroy()
	img := filepath.Join(dir, "vol.img")
	c, err := disk.CreateImage(img, key, disk.CreateOptions{Size: size, SectorSize: sectorSize, PBKDF: disk.PBKDF2})
	if err != nil {
		t.Fatal(err)
	}
	c.Wipe()
	im, err := disk.OpenImage(img, key, true)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { im.Close() })
	return img, keyFile, im
}

func randBytes(t testing.TB, n int) []byte {
	t.Helper()
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return b
}

func writeFile(t testing.TB, b []byte) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "data.raw")
	if err := os.WriteFile(p, b, 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func run(t testing.TB, prog string, args ...string) string {
	t.Helper()
	path := testutil.LookPath(t, prog)
	out, err := exec.Command(path, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", prog, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// rawClient speaks the protocol byte by byte, for the cases no real client
// would send.
type rawClient struct {
	t testing.TB
	c net.Conn
}

func dialRaw(t testing.TB, sock string) *rawClient {
	t.Helper()
	c, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return &rawClient{t: t, c: c}
}

// hello reads the greeting and sends the client flags.
func (r *rawClient) hello(flags uint32) {
	r.t.Helper()
	g := r.read(18)
	if !bytes.Equal(g[:16], []byte("NBDMAGICIHAVEOPT")) {
		r.t.Fatalf("greeting %q", g)
	}
	r.write(binary.BigEndian.AppendUint32(nil, flags))
}

func (r *rawClient) option(opt uint32, data []byte) {
	r.t.Helper()
	b := binary.BigEndian.AppendUint64(nil, 0x49484156454f5054)
	b = binary.BigEndian.AppendUint32(b, opt)
	b = binary.BigEndian.AppendUint32(b, uint32(len(data)))
	r.write(append(b, data...))
}

// optReply returns the next option reply's type and data.
func (r *rawClient) optReply() (uint32, []byte) {
	r.t.Helper()
	h := r.read(20)
	if binary.BigEndian.Uint64(h) != 0x0003e889045565a9 {
		r.t.Fatalf("option reply magic %x", h[:8])
	}
	return binary.BigEndian.Uint32(h[12:]), r.read(int(binary.BigEndian.Uint32(h[16:])))
}

// goExport negotiates NBD_OPT_GO for the default export.
func (r *rawClient) goExport() {
	r.t.Helper()
	r.hello(3)
	r.option(7, []byte{0, 0, 0, 0, 0, 0})
	for {
		typ, _ := r.optReply()
		if typ == 1 {
			return
		}
		if typ != 3 {
			r.t.Fatalf("NBD_OPT_GO reply type 0x%x", typ)
		}
	}
}

// reply reads a simple reply and returns its errno and cookie.
func (r *rawClient) reply() (uint32, uint64) {
	r.t.Helper()
	h := r.read(16)
	if binary.BigEndian.Uint32(h) != 0x67446698 {
		r.t.Fatalf("reply magic %x", h[:4])
	}
	return binary.BigEndian.Uint32(h[4:]), binary.BigEndian.Uint64(h[8:])
}

func (r *rawClient) write(b []byte) {
	r.t.Helper()
	if _, err := r.c.Write(b); err != nil {
		r.t.Fatalf("write: %v", err)
	}
}

func (r *rawClient) read(n int) []byte {
	r.t.Helper()
	b := make([]byte, n)
	if _, err := io.ReadFull(r.c, b); err != nil {
		r.t.Fatalf("read %d bytes: %v", n, err)
	}
	return b
}

// closed reports whether the server closed the connection (EOF on read).
func (r *rawClient) closed() error {
	var b [1]byte
	n, err := r.c.Read(b[:])
	if err == io.EOF || (err != nil && strings.Contains(err.Error(), "reset")) {
		return nil
	}
	return fmt.Errorf("connection still open: read %d bytes, err %v", n, err)
}

func newAES(key []byte) (cipher.Block, error) { return aes.NewCipher(key) }

func contains(s, sub string) bool { return strings.Contains(s, sub) }
