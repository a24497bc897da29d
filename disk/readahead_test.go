package disk_test

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/keygate/keygate/disk"
)

// TestReadAheadInvalidation reads a file sequentially until a chunk is
// read ahead, lets that readahead finish, changes the file (or not), and
// reads the chunk: the read must return the file as it is now, never the
// chunk as it was read ahead. The unchanged case shows the chunk is served
// from the readahead, so that the others test its invalidation.
func TestReadAheadInvalidation(t *testing.T) {
	const chunk = 256 << 10
	type env struct {
		fsys   *disk.FS
		h, h2  *disk.File // h reads; h2 is a second handle on the same file
		model  []byte     // the file's content as it should read now
		served bool       // the read after the change comes from the readahead
	}
	cases := []struct {
		name   string
		size   int // of the file before the change
		change func(t *testing.T, e *env)
	}{
		{"unchanged", 2 << 20, func(t *testing.T, e *env) { e.served = true }},
		{"write through the reading handle", 2 << 20, func(t *testing.T, e *env) {
			writeModel(t, e.h, e.model, chunk+1000, 5000)
		}},
		{"write through another handle", 2 << 20, func(t *testing.T, e *env) {
			writeModel(t, e.h2, e.model, 2*chunk-10, 10)
		}},
		{"write at the chunk's first byte", 2 << 20, func(t *testing.T, e *env) {
			writeModel(t, e.h2, e.model, chunk, 1)
		}},
		{"truncate into the chunk", 2 << 20, func(t *testing.T, e *env) {
			if err := e.h2.Truncate(chunk + 7000); err != nil {
				t.Fatal(err)
			}
			e.model = e.model[:chunk+7000]
		}},
		{"truncate into the chunk, then grow again", 2 << 20, func(t *testing.T, e *env) {
			for _, n := range []int64{chunk + 7000, 2 << 20} {
				if err := e.h2.Truncate(n); err != nil {
					t.Fatal(err)
				}
			}
			clear(e.model[chunk+7000:])
		}},
		{"truncate by path", 2 << 20, func(t *testing.T, e *env) {
			if err := e.fsys.Truncate("/f", chunk+100); err != nil {
				t.Fatal(err)
			}
			e.model = e.model[:chunk+100]
		}},
		{"write, then sync", 2 << 20, func(t *testing.T, e *env) {
			writeModel(t, e.h2, e.model, chunk+chunk/2, 4096)
			if err := e.h2.Sync(); err != nil {
				t.Fatal(err)
			}
		}},
		{"the readahead met the end, then the file grew", chunk + 5000, func(t *testing.T, e *env) {
			e.model = append(e.model, make([]byte, 2*chunk)...)
			writeModel(t, e.h2, e.model, 2*chunk+100, 3000)
		}},
		{"the readahead met the end, unchanged", chunk + 5000, func(t *testing.T, e *env) { e.served = true }},
	}
	for _, typ := range fsTypes {
		for _, c := range cases {
			t.Run(fmt.Sprintf("%s/%s", typ, c.name), func(t *testing.T) {
				fsys, _ := newFS(t, typ, 64<<20)
				e := &env{fsys: fsys, model: randBytes(c.size)}
				put(t, fsys, "/f", e.model)
				e.model = bytes.Clone(e.model)
				var err error
				if e.h, err = fsys.OpenFile("/f", os.O_RDWR); err != nil {
					t.Fatal(err)
				}
				defer e.h.Close()
				if e.h2, err = fsys.OpenFile("/f", os.O_RDWR); err != nil {
					t.Fatal(err)
				}
				defer e.h2.Close()
				buf := make([]byte, chunk)
				if n, err := e.h.ReadAt(buf, 0); n != chunk || err != nil || !bytes.Equal(buf, e.model[:chunk]) {
					t.Fatalf("first read: %d, %v, or wrong bytes", n, err)
				}
				disk.AwaitReadAhead(e.h)
				before := disk.ReadAheads(fsys)
				c.change(t, e)
				n, err := e.h.ReadAt(buf, chunk)
				want := e.model[chunk:min(len(e.model), 2*chunk)]
				if !bytes.Equal(buf[:n], want) {
					t.Errorf("read %d bytes at %d, %v: not the file's content now (%d bytes)", n, chunk, err, len(want))
				}
				if wantErr := error(nil); len(want) < chunk && !errors.Is(err, io.EOF) || len(want) == chunk && err != wantErr {
					t.Errorf("read at %d: %v; want io.EOF only for a short read", chunk, err)
				}
				if got := disk.ReadAheads(fsys) - before; got != 0 != e.served {
					t.Errorf("%d reads served from the readahead; want served %v", got, e.served)
				}
			})
		}
	}
}

// writeModel writes n random bytes at off through h, and into model.
func writeModel(t *testing.T, h *disk.File, model []byte, off, n int) {
	t.Helper()
	b := randBytes(n)
	if _, err := h.WriteAt(b, int64(off)); err != nil {
		t.Fatal(err)
	}
	copy(model[off:], b)
}

// TestReadAheadRacingWriter reads a file sequentially, over and over,
// while another handle rewrites its chunks with ever higher values: a
// read that starts after a write of a chunk returned must see that value
// or a later one, never what a readahead read before the write.
func TestReadAheadRacingWriter(t *testing.T) {
	const (
		chunk  = 128 << 10
		chunks = 8
		rounds = 40
	)
	for _, typ := range fsTypes {
		t.Run(string(typ), func(t *testing.T) {
			fsys, _ := newFS(t, typ, 64<<20)
			put(t, fsys, "/f", make([]byte, chunk*chunks))
			r, err := fsys.OpenFile("/f", os.O_RDONLY)
			if err != nil {
				t.Fatal(err)
			}
			defer r.Close()
			w, err := fsys.OpenFile("/f", os.O_RDWR)
			if err != nil {
				t.Fatal(err)
			}
			defer w.Close()
			var written [chunks]atomic.Int32 // the value each chunk's last completed write left
			var wg sync.WaitGroup
			wg.Add(1)
			go func() {
				defer wg.Done()
				b := make([]byte, chunk)
				for v := 1; v <= rounds; v++ {
					for i := range chunks {
						for j := range b {
							b[j] = byte(v)
						}
						if _, err := w.WriteAt(b, int64(i*chunk)); err != nil {
							t.Error(err)
							return
						}
						written[i].Store(int32(v))
					}
				}
			}()
			buf := make([]byte, chunk)
			for pass := 0; written[chunks-1].Load() < rounds; pass++ {
				for i := range chunks {
					least := written[i].Load()
					if n, err := r.ReadAt(buf, int64(i*chunk)); n != chunk || err != nil {
						t.Fatalf("pass %d, chunk %d: read %d, %v", pass, i, n, err)
					}
					if v := int32(buf[0]); v < least || !bytes.Equal(buf, bytes.Repeat(buf[:1], chunk)) {
						t.Fatalf("pass %d, chunk %d: read value %d (or mixed), after a write of %d had returned", pass, i, v, least)
					}
				}
			}
			wg.Wait()
		})
	}
}
