package ninep

import (
	"encoding/binary"
	"errors"
	"testing"
)

func le32(v uint32) []byte { return binary.LittleEndian.AppendUint32(nil, v) }
func le64(v uint64) []byte { return binary.LittleEndian.AppendUint64(nil, v) }
func s9(s string) []byte   { return append(binary.LittleEndian.AppendUint16(nil, uint16(len(s))), s...) }

func cat(parts ...[]byte) []byte {
	var b []byte
	for _, p := range parts {
		b = append(b, p...)
	}
	return b
}

func walkBody(n int) []byte {
	b := cat(le32(1), le32(2), binary.LittleEndian.AppendUint16(nil, uint16(n)))
	for range n {
		b = append(b, s9("d")...)
	}
	return b
}

// TestDecodeRequest: well-formed bodies decode to their fields; every
// malformed one is errMalformed, never a panic or a field read past the end.
func TestDecodeRequest(t *testing.T) {
	for _, tc := range []struct {
		name  string
		typ   byte
		body  []byte
		bad   bool
		check func(request) bool
	}{
		{"version", msgTversion, cat(le32(1<<19), s9("9P2000.L")), false,
			func(q request) bool { return q.msize == 1<<19 && q.name == "9P2000.L" }},
		{"walk of 16 names", msgTwalk, walkBody(16), false,
			func(q request) bool { return len(q.names) == 16 && q.newFID == 2 }},
		{"walk of 17 names", msgTwalk, walkBody(17), true, nil},
		{"walk name longer than the body", msgTwalk, cat(le32(1), le32(2), []byte{1, 0, 0xff, 0xff, 'a'}), true, nil},
		{"walk names missing", msgTwalk, cat(le32(1), le32(2), []byte{3, 0}, s9("a")), true, nil},
		{"read", msgTread, cat(le32(3), le64(1<<40), le32(4096)), false,
			func(q request) bool { return q.fid == 3 && q.offset == 1<<40 && q.count == 4096 }},
		{"read cut short", msgTread, cat(le32(3), le64(0)), true, nil},
		{"write", msgTwrite, cat(le32(3), le64(8), le32(3), []byte("abc")), false,
			func(q request) bool { return string(q.data) == "abc" && q.offset == 8 }},
		{"write count past the frame", msgTwrite, cat(le32(3), le64(8), le32(1<<30), []byte("abc")), true, nil},
		{"fsync as Linux sends it (datasync)", msgTfsync, cat(le32(9), le32(1)), false,
			func(q request) bool { return q.fid == 9 }},
		{"getlock", msgTgetlock, cat(le32(2), []byte{1}, le64(100), le64(10), le32(7), s9("guest")), false,
			func(q request) bool { return q.lock.client == "guest" && q.lock.start == 100 && q.lock.pid == 7 }},
		{"getlock client id past the frame", msgTgetlock, cat(le32(2), []byte{1}, le64(100), le64(10), le32(7), []byte{9, 0}, []byte("ab")), true, nil},
		{"lock", msgTlock, cat(le32(2), []byte{1}, le32(1), le64(5), le64(0), le32(7), s9("g")), false,
			func(q request) bool { return q.flags == 1 && q.lock.typ == 1 && q.lock.start == 5 }},
		{"renameat", msgTrenameat, cat(le32(1), s9("a"), le32(2), s9("b")), false,
			func(q request) bool { return q.name == "a" && q.newFID == 2 && q.name2 == "b" }},
		{"setattr size", msgTsetattr, cat(le32(1), le32(8), le32(0), le32(0), le32(0), le64(77), le64(0), le64(0), le64(0), le64(0)), false,
			func(q request) bool { return q.setMask.Size && q.setAttr.Size == 77 }},
		{"setattr cut short", msgTsetattr, cat(le32(1), le32(8)), true, nil},
		{"empty body", msgTattach, nil, true, nil},
		{"unknown type: not read", 0xEE, nil, false, func(q request) bool { return q.typ == 0xEE }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			q, err := decodeRequest(tc.typ, 5, tc.body)
			if tc.bad {
				if !errors.Is(err, errMalformed) {
					t.Fatalf("got %v, want errMalformed", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if q.tag != 5 || !tc.check(q) {
				t.Fatalf("decoded %+v", q)
			}
		})
	}
}

// FuzzDecodeRequest: no body of any type panics the decoder, and what it
// accepts stays inside the body it was given.
func FuzzDecodeRequest(f *testing.F) {
	f.Add(byte(msgTversion), cat(le32(1<<19), s9("9P2000.L")))
	f.Add(byte(msgTwalk), walkBody(2))
	f.Add(byte(msgTwrite), cat(le32(3), le64(8), le32(3), []byte("abc")))
	f.Add(byte(msgTgetlock), cat(le32(2), []byte{1}, le64(100), le64(10), le32(7), s9("guest")))
	f.Add(byte(msgTlcreate), cat(le32(1), s9("f"), le32(2), le32(0o644), le32(0)))
	f.Add(byte(msgTsetattr), cat(le32(1), le32(8), le32(0), le32(0), le32(0), le64(77), le64(0), le64(0), le64(0), le64(0)))
	f.Fuzz(func(t *testing.T, typ byte, body []byte) {
		q, err := decodeRequest(typ, 1, body)
		if err != nil {
			if !errors.Is(err, errMalformed) {
				t.Fatalf("error %v is not errMalformed", err)
			}
			return
		}
		if len(q.names) > maxWelem {
			t.Fatalf("%d names accepted", len(q.names))
		}
		if len(q.data) > len(body) {
			t.Fatalf("write payload of %d bytes from a body of %d", len(q.data), len(body))
		}
	})
}
