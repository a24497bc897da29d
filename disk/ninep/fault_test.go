package ninep_test

import (
	"bytes"
	"encoding/binary"
	"encoding/hex"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/hugelgupf/p9/p9"

	"github.com/keygate/keygate/disk"
	"github.com/keygate/keygate/disk/ninep"
	"github.com/keygate/keygate/internal/testutil"
)

// 9P message types used to build raw frames.
const (
	tVersion = 100
	tAttach  = 104
	tWalk    = 110
	tRead    = 116
	tWrite   = 118
	tLopen   = 12
	tClunk   = 120
)

// frame builds a 9P message: size[4] type[1] tag[2] body.
func frame(typ byte, tag uint16, body ...[]byte) []byte {
	b := []byte{0, 0, 0, 0, typ, byte(tag), byte(tag >> 8)}
	for _, p := range body {
		b = append(b, p...)
	}
	binary.LittleEndian.PutUint32(b, uint32(len(b)))
	return b
}

func u32(v uint32) []byte { return binary.LittleEndian.AppendUint32(nil, v) }
func u64(v uint64) []byte { return binary.LittleEndian.AppendUint64(nil, v) }
func str(s string) []byte {
	return append(binary.LittleEndian.AppendUint16(nil, uint16(len(s))), s...)
}

var version = frame(tVersion, 0xFFFF, u32(65536), str("9P2000.L"))

func attach(fid uint32) []byte {
	return frame(tAttach, 1, u32(fid), u32(0xFFFFFFFF), str(""), str("/"), u32(0xFFFFFFFF))
}

func cat(parts ...[]byte) []byte { return bytes.Join(parts, nil) }

// malformed are inputs a broken or hostile client might send.
var malformed = []struct {
	name string
	in   []byte
	keep bool // leave the connection open afterwards (a stalled client)
}{
	{"garbage", []byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n\x00\xff\xfe\x01garbage"), false},
	{"random", nil, false}, // filled in with random bytes
	{"truncated frame", frame(tVersion, 0xFFFF, u32(65536), str("9P2000.L"))[:9], true},
	{"truncated then closed", frame(tVersion, 0xFFFF, u32(65536), str("9P2000.L"))[:9], false},
	{"absurd size", cat(u32(0xFFFFFFFF), []byte{tVersion, 0xFF, 0xFF}, u32(65536)), false},
	{"size below header", cat(u32(3), []byte{tVersion, 0, 0}), false},
	{"size zero", u32(0), false},
	{"unknown type", cat(version, frame(0xEE, 1, u32(1), u32(2))), false},
	{"message before version", attach(1), false},
	{"walk before attach", cat(version, frame(tWalk, 1, u32(7), u32(8), []byte{1, 0}, str("x"))), false},
	{"string longer than frame", cat(version, frame(tAttach, 1, u32(1), u32(0xFFFFFFFF), []byte{0xFF, 0xFF}, []byte("ab"))), false},
	{"walk with 65535 names", cat(version, attach(1), frame(tWalk, 2, u32(1), u32(2), []byte{0xFF, 0xFF}, str("a"))), false},
	{"read huge count", cat(version, attach(1), frame(tLopen, 2, u32(1), u32(0)), frame(tRead, 3, u32(1), u64(0), u32(0xFFFFFFFF))), false},
	{"write count past frame", cat(version, attach(1), frame(tWrite, 2, u32(1), u64(0), u32(1<<30), []byte("x"))), false},
	{"version msize 0", frame(tVersion, 0xFFFF, u32(0), str("9P2000.L")), false},
	{"version unknown", frame(tVersion, 0xFFFF, u32(8192), str("9P3000.Z")), false},
	{"duplicate tags", cat(version, attach(1), frame(tWalk, 5, u32(1), u32(2), []byte{0, 0}), frame(tWalk, 5, u32(1), u32(2), []byte{0, 0})), false},
}

// drain reads whatever the server answers until it closes the connection
// or goes quiet. The deadline bounds a wait; nothing is asserted about time.
func drain(c net.Conn) []byte {
	c.SetReadDeadline(time.Now().Add(2 * time.Second))
	var b bytes.Buffer
	io.Copy(&b, io.LimitReader(c, 1<<20))
	return b.Bytes()
}

// replyTypes lists the message types of the frames in b.
func replyTypes(b []byte) []byte {
	var types []byte
	for len(b) >= 7 {
		n := binary.LittleEndian.Uint32(b)
		if n < 7 || uint64(n) > uint64(len(b)) {
			break
		}
		types = append(types, b[4])
		b = b[n:]
	}
	return types
}

// alive checks that a fresh client can attach, list, write and read.
func alive(t testing.TB, sock string) {
	t.Helper()
	conn, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatalf("server gone: %v", err)
	}
	c, err := p9.NewClient(conn)
	if err != nil {
		t.Fatalf("server does not answer Tversion: %v", err)
	}
	defer c.Close()
	root, err := c.Attach("/")
	if err != nil {
		t.Fatalf("attach: %v", err)
	}
	defer root.Close()
	name := "alive-" + hex.EncodeToString(randBytes(6))
	data := randBytes(10_000)
	writeFile(t, root, data, nil, name)
	if got := readFile(t, root, name); !bytes.Equal(got, data) {
		t.Fatal("a fresh client reads back different data")
	}
	if err := root.UnlinkAt(name, 0); err != nil {
		t.Fatal(err)
	}
}

func TestMalformedMessages(t *testing.T) {
	for _, typ := range fsTypes {
		t.Run(string(typ), func(t *testing.T) {
			v := newVolume(t, typ, 64<<20)
			// a client connected throughout keeps working
			steady := v.client()
			keep := randBytes(70_000)
			writeFile(t, steady, keep, nil, "keep")
			for _, tc := range malformed {
				t.Run(tc.name, func(t *testing.T) {
					in := tc.in
					if in == nil {
						in = randBytes(4096)
					}
					conn, err := net.Dial("unix", v.sock)
					if err != nil {
						t.Fatal(err)
					}
					defer conn.Close()
					if _, err := conn.Write(in); err != nil {
						t.Logf("write: %v (the server may close early)", err)
					}
					if !tc.keep {
						conn.(*net.UnixConn).CloseWrite()
						out := drain(conn)
						t.Logf("server answered % x", out[:min(len(out), 64)])
						// a well-formed Tversion first is answered despite the bad
						// part (requests run concurrently: replies come in any order)
						if bytes.HasPrefix(in, version) && !slices.Contains(replyTypes(out), tVersion+1) {
							t.Fatalf("no Rversion for the valid Tversion: % x", out)
						}
					}
					alive(t, v.sock)
					if got := readFile(t, steady, "keep"); !bytes.Equal(got, keep) {
						t.Fatal("the steady client reads different data")
					}
				})
			}
			fsck(t, v)
		})
	}
}

// fsck stops the server and checks the filesystem with the real tool on a
// decrypted copy of the volume.
func fsck(t *testing.T, v *volume) {
	t.Helper()
	tool, args := "e2fsck", []string{"-fn"}
	if v.fsys.Type() == disk.FAT32 {
		tool, args = "fsck.fat", []string{"-n"}
	}
	prog := testutil.LookPath(t, tool)
	v.stop()
	im, err := disk.OpenImage(v.path, v.key, false)
	if err != nil {
		t.Fatal(err)
	}
	defer im.Close()
	d := im.Device()
	plain := make([]byte, d.Size())
	if _, err := d.ReadAt(plain, 0); err != nil {
		t.Fatal(err)
	}
	img := filepath.Join(t.TempDir(), "plain.img")
	if err := os.WriteFile(img, plain, 0o600); err != nil {
		t.Fatal(err)
	}
	clear(plain)
	if out, err := exec.Command(prog, append(args, img)...).CombinedOutput(); err != nil {
		t.Fatalf("%s found problems: %v\n%s", tool, err, out)
	}
}

// FuzzServer feeds arbitrary bytes to a live server connection, then
// checks that the server still serves a fresh client. The seeds are a
// real client's session (recorded) and the malformed cases above.
func FuzzServer(f *testing.F) {
	v := newVolume(f, disk.Ext4, 48<<20, ninep.WithLogger(slog.New(slog.DiscardHandler)))
	f.Add(recordSession(f, v.sock))
	// Tgetlock, decoded natively (wire.go): whole, cut short,
	// and with a client id longer than its frame.
	getlock := append(append(u32(2), 1), append(append(u64(0), u64(10)...), u32(7)...)...)
	f.Add(append(version, frame(54, 1, getlock, str("guest"))...))
	f.Add(append(version, frame(54, 1, getlock[:9])...))
	f.Add(append(version, frame(54, 1, getlock, u32(0xffff))...))
	for _, tc := range malformed {
		if tc.in != nil {
			f.Add(tc.in)
		}
	}
	f.Fuzz(func(t *testing.T, in []byte) {
		conn, err := net.Dial("unix", v.sock)
		if err != nil {
			t.Fatal(err)
		}
		conn.Write(in)
		conn.(*net.UnixConn).CloseWrite()
		drain(conn)
		conn.Close()
		alive(t, v.sock)
	})
}

// recorder keeps what a client sends.
type recorder struct {
	net.Conn
	sent bytes.Buffer
}

func (r *recorder) Write(p []byte) (int, error) {
	r.sent.Write(p)
	return r.Conn.Write(p)
}

// recordSession runs a real client through the main operations and returns
// the bytes it sent, so that the fuzzer starts from well-formed traffic.
func recordSession(t testing.TB, sock string) []byte {
	conn, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	rec := &recorder{Conn: conn}
	c, err := p9.NewClient(rec, p9.WithMessageSize(8192))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	root, err := c.Attach("/")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := root.Mkdir("seed", 0o755, p9.NoUID, p9.NoGID); err != nil {
		t.Fatal(err)
	}
	writeFile(t, root, []byte("seed data"), []string{"seed"}, "s.txt")
	readFile(t, root, "seed", "s.txt")
	list(t, root, "seed")
	d := mustWalk(t, root, "seed")
	if err := d.RenameAt("s.txt", d, "t.txt"); err != nil {
		t.Fatal(err)
	}
	if err := d.UnlinkAt("t.txt", 0); err != nil {
		t.Fatal(err)
	}
	d.Close()
	if err := root.UnlinkAt("seed", 0x200); err != nil {
		t.Fatal(err)
	}
	return bytes.Clone(rec.sent.Bytes())
}

// TestAbruptDisconnects pipelines requests and hangs up without reading
// the replies, many times: the teardown of a connection with requests in
// flight must not take the server down.
func TestAbruptDisconnects(t *testing.T) {
	v := newVolume(t, disk.Ext4, 40<<20)
	writeFile(t, v.client(), []byte("data"), nil, "f")
	var burst []byte
	burst = append(burst, version...)
	burst = append(burst, attach(1)...)
	for i := range 64 {
		burst = append(burst, frame(tWalk, uint16(2+i), u32(1), u32(uint32(100+i)), []byte{1, 0}, str("f"))...)
	}
	for range 200 {
		conn, err := net.Dial("unix", v.sock)
		if err != nil {
			t.Fatal(err)
		}
		conn.Write(burst)
		conn.Close()
	}
	alive(t, v.sock)
}

// TestHangUpDuringFlush closes a connection while the server is still
// storing a file at its clunk: the server keeps serving, and the file is
// stored whole by the time Close returns. (This is where hugelgupf/p9
// v0.3.0's teardown can panic; see Server.handle.)
func TestHangUpDuringFlush(t *testing.T) {
	for i := range 5 {
		v := newVolume(t, disk.Ext4, 64<<20)
		conn, err := net.Dial("unix", v.sock)
		if err != nil {
			t.Fatal(err)
		}
		c, err := p9.NewClient(conn)
		if err != nil {
			t.Fatal(err)
		}
		root, err := c.Attach("/") // fid 1
		if err != nil {
			t.Fatal(err)
		}
		f := create(t, root, "big") // fid 2
		data := randBytes(8 << 20)
		if _, err := f.WriteAt(data, 0); err != nil {
			t.Fatal(err)
		}
		// a fast request, so that the connection's first goroutine is free
		// to read the hang-up, then a slow clunk (it stores 8 MiB)
		conn.Write(cat(frame(tWalk, 499, u32(1), u32(50), []byte{0, 0}), frame(tClunk, 500, u32(2))))
		conn.Close()
		alive(t, v.sock)
		if got := getAll(t, v.reopen(), "/big"); !bytes.Equal(got, data) {
			t.Fatalf("round %d: /big has %d bytes after the hang-up, not the 8 MiB written", i, len(got))
		}
	}
}
