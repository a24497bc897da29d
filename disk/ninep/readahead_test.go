package ninep_test

import (
	"bytes"
	"testing"

	"github.com/hugelgupf/p9/p9"

	"github.com/keygate/keygate/disk"
)

// TestReadaheadNeverStale: a sequential reader's next chunk is read ahead
// by the server; whatever changes the file between two reads, through
// another fid on another connection or through the reader's own fid, the
// second read sees the change.
func TestReadaheadNeverStale(t *testing.T) {
	const chunk = 16 << 10
	for _, tc := range []struct {
		name   string
		change func(t *testing.T, own p9.File, other p9.File) // between the reads of chunks 0 and 1
		want   func(orig []byte) []byte                         // chunk 1 as the second read must see it
	}{
		{"nothing changes", func(*testing.T, p9.File, p9.File) {},
			func(orig []byte) []byte { return orig[chunk : 2*chunk] }},
		{"a write by another client", func(t *testing.T, _, other p9.File) {
			f := mustWalk(t, other, "f")
			defer f.Close()
			if _, _, err := f.Open(p9.ReadWrite); err != nil {
				t.Fatal(err)
			}
			if _, err := f.WriteAt(bytes.Repeat([]byte("B"), 100), chunk+10); err != nil {
				t.Fatal(err)
			}
		}, func(orig []byte) []byte {
			c := bytes.Clone(orig[chunk : 2*chunk])
			copy(c[10:], bytes.Repeat([]byte("B"), 100))
			return c
		}},
		{"a write through the reader's fid", func(t *testing.T, own, _ p9.File) {
			if _, err := own.WriteAt([]byte("own"), chunk); err != nil {
				t.Fatal(err)
			}
		}, func(orig []byte) []byte {
			c := bytes.Clone(orig[chunk : 2*chunk])
			copy(c, "own")
			return c
		}},
		{"a truncation by another client", func(t *testing.T, _, other p9.File) {
			f := mustWalk(t, other, "f")
			defer f.Close()
			if err := f.SetAttr(p9.SetAttrMask{Size: true}, p9.SetAttr{Size: chunk + 5}); err != nil {
				t.Fatal(err)
			}
		}, func(orig []byte) []byte { return orig[chunk : chunk+5] }},
		{"the file replaced by a rename", func(t *testing.T, _, other p9.File) {
			writeFile(t, other, bytes.Repeat([]byte("N"), 3*chunk), nil, "new")
			if err := other.RenameAt("new", other, "f"); err != nil {
				t.Fatal(err)
			}
		}, func(orig []byte) []byte { return orig[chunk : 2*chunk] }}, // an open file keeps its content
	} {
		t.Run(tc.name, func(t *testing.T) {
			v := newVolume(t, disk.Ext4, 64<<20)
			orig := randBytes(3 * chunk)
			writeFile(t, v.client(), orig, nil, "f")
			own := mustWalk(t, v.client(), "f")
			if _, _, err := own.Open(p9.ReadWrite); err != nil {
				t.Fatal(err)
			}
			buf := make([]byte, chunk)
			if n, err := own.ReadAt(buf, 0); err != nil || n != chunk || !bytes.Equal(buf, orig[:chunk]) {
				t.Fatalf("first read: %d, %v", n, err)
			}
			tc.change(t, own, v.client())
			want := tc.want(orig)
			n, err := own.ReadAt(buf, chunk)
			if err != nil && n == 0 && len(want) > 0 {
				t.Fatalf("second read: %v", err)
			}
			if !bytes.Equal(buf[:n], want) {
				t.Fatalf("second read: %d bytes, want %d; differs at the readahead's range", n, len(want))
			}
		})
	}
}
