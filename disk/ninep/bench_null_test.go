package ninep_test

import (
	"net"
	"path/filepath"
	"testing"

	"github.com/hugelgupf/p9/fsimpl/templatefs"
	"github.com/hugelgupf/p9/linux"
	"github.com/hugelgupf/p9/p9"
)

// nullFile is a 9P tree of one directory whose every name is a file that
// reads as len(p) bytes of whatever the buffer held, at no cost: the
// transport's ceiling for BenchmarkBigFile's reads.
type nullFile struct {
	templatefs.NoopFile
	leaf bool
}

func (nullFile) Walk(names []string) ([]p9.QID, p9.File, error) {
	q := make([]p9.QID, len(names))
	for i := range q {
		q[i].Type = p9.TypeRegular
	}
	return q, nullFile{leaf: true}, nil
}

func (nullFile) WalkGetAttr([]string) ([]p9.QID, p9.File, p9.AttrMask, p9.Attr, error) {
	return nil, nil, p9.AttrMask{}, p9.Attr{}, linux.ENOSYS
}

func (n nullFile) GetAttr(p9.AttrMask) (p9.QID, p9.AttrMask, p9.Attr, error) {
	if !n.leaf {
		return p9.QID{Type: p9.TypeDir}, p9.AttrMask{Mode: true}, p9.Attr{Mode: p9.ModeDirectory | 0o755}, nil
	}
	return p9.QID{Type: p9.TypeRegular}, p9.AttrMask{Mode: true}, p9.Attr{Mode: p9.ModeRegular | 0o644}, nil
}

func (nullFile) Open(p9.OpenFlags) (p9.QID, uint32, error) {
	return p9.QID{Type: p9.TypeRegular}, 0, nil
}

func (nullFile) ReadAt(p []byte, _ int64) (int, error) { return len(p), nil }

type nullAttacher struct{}

func (nullAttacher) Attach() (p9.File, error) { return nullFile{}, nil }

// nullRoot serves the null tree on a unix socket, with the send buffer
// the keygate server asks for, and attaches the benchmark's client.
func nullRoot(b *testing.B) p9.File {
	l, err := net.Listen("unix", filepath.Join(b.TempDir(), "null.sock"))
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { l.Close() })
	srv := p9.NewServer(nullAttacher{})
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			c.(*net.UnixConn).SetWriteBuffer(1 << 20)
			go srv.Handle(c, c)
		}
	}()
	return attachAt(b, l.Addr().String())
}
