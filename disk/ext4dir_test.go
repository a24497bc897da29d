package disk

import (
	"encoding/binary"
	"testing"
)

// FuzzDirRecords feeds directory blocks, as a volume may hold them, to
// the record walker and to unlink: no panic, records that tile the block
// from its start, and a block with one record unlinked that still walks.
func FuzzDirRecords(f *testing.F) {
	m := &ext4Meta{bs: 1024, metaCsum: true}
	empty := m.emptyDirBlock(2, make([]byte, 256))
	f.Add(empty)
	two := make([]byte, 1024)
	putRecord(two, 0, 2, 12, ".", 2)
	putRecord(two, 12, 2, 1024-12-direntTail, "..", 2)
	putRecord(two, 1024-direntTail, 0, direntTail, "", 0xde)
	f.Add(two)
	dx := make([]byte, 1024) // an htree root: ".." spans the index
	putRecord(dx, 0, 2, 12, ".", 2)
	putRecord(dx, 12, 2, 1024-12, "..", 2)
	binary.LittleEndian.PutUint16(dx[0x20:], 120)
	binary.LittleEndian.PutUint16(dx[0x22:], 1)
	f.Add(dx)
	f.Add([]byte{1, 0, 0, 0, 8, 0, 9, 1})
	f.Fuzz(func(t *testing.T, b []byte) {
		rs, err := records(b)
		if err != nil {
			return
		}
		end := 0
		for _, r := range rs {
			if r.off != end || r.recLen < 8 || r.off+r.recLen > len(b) || recSize(len(r.name)) > r.recLen+3 {
				t.Fatalf("record %+v does not follow at %d", r, end)
			}
			end += r.recLen
		}
		for _, r := range rs {
			c := append([]byte(nil), b...)
			unlink(c, r)
			if _, err := records(c); err != nil && r.prev >= 0 {
				t.Fatalf("unlinking %+v broke the block: %v", r, err)
			}
		}
	})
}
