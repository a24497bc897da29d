package ninep

import (
	"errors"
	"fmt"
	"io"
	"net"
	"strings"

	"github.com/hugelgupf/p9/p9"
)

// Dial attaches to a 9P2000.L server on a unix socket, as a Go program or a
// test reaches `keygate boot --serve-9p` where no kernel mounts it. It
// returns the attached root and a function that clunks it and hangs up.
func Dial(socket string) (root p9.File, hangup func() error, err error) {
	conn, err := net.Dial("unix", socket)
	if err != nil {
		return nil, nil, fmt.Errorf("dial 9P socket: %w", err)
	}
	c, err := p9.NewClient(conn)
	if err != nil {
		conn.Close()
		return nil, nil, fmt.Errorf("9P version on %s: %w", socket, err)
	}
	root, err = c.Attach("")
	if err != nil {
		c.Close()
		return nil, nil, fmt.Errorf("9P attach on %s: %w", socket, err)
	}
	return root, func() error { return errors.Join(root.Close(), c.Close()) }, nil
}

// split turns "a/b/c" (leading slash optional) into its walk names.
func split(path string) []string {
	var names []string
	for _, n := range strings.Split(path, "/") {
		if n != "" {
			names = append(names, n)
		}
	}
	return names
}

// WriteFile creates the file at path under root (its directory must
// exist; the file must not), writes data, then fsyncs and clunks it: once
// it returns, the data is durable on the volume.
func WriteFile(root p9.File, path string, data []byte) error {
	names := split(path)
	if len(names) == 0 {
		return fmt.Errorf("write %q: no file name", path)
	}
	_, dir, err := root.Walk(names[:len(names)-1])
	if err != nil {
		return fmt.Errorf("write %s: walk to its directory: %w", path, err)
	}
	// Create turns the directory's fid into the new file's.
	f, _, _, err := dir.Create(names[len(names)-1], p9.WriteOnly, 0o644, p9.NoUID, p9.NoGID)
	if err != nil {
		dir.Close()
		return fmt.Errorf("create %s: %w", path, err)
	}
	for off := 0; off < len(data) && err == nil; {
		var n int
		n, err = f.WriteAt(data[off:], int64(off))
		if n == 0 && err == nil {
			err = io.ErrShortWrite
		}
		off += n
	}
	if err == nil {
		err = f.FSync()
	}
	if err = errors.Join(err, f.Close()); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}

// ReadFile reads the file at path under root whole.
func ReadFile(root p9.File, path string) ([]byte, error) {
	_, f, err := root.Walk(split(path))
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", path, err)
	}
	defer f.Close()
	if _, _, err := f.Open(p9.ReadOnly); err != nil {
		return nil, fmt.Errorf("open %s: %w", path, err)
	}
	var out []byte
	buf := make([]byte, 64<<10)
	for {
		n, err := f.ReadAt(buf, int64(len(out)))
		out = append(out, buf[:n]...)
		if err == io.EOF || (err == nil && n == 0) {
			return out, nil
		}
		if err != nil {
			return out, fmt.Errorf("read %s: %w", path, err)
		}
	}
}
