package ninep

import (
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/hugelgupf/p9/p9"
)

// The 9P2000.L wire format, as Linux's net/9p and diod's protocol.md
// describe it: every message is size[4] type[1] tag[2] and a body of
// little-endian integers, strings as len[2] bytes, and qids as type[1]
// version[4] path[8]. This file decodes the T-messages a client sends and
// encodes the R-messages the server answers; it knows nothing of files.

// Message types (include/net/9p/9p.h).
const (
	msgRlerror     = 7
	msgTstatfs     = 8
	msgTlopen      = 12
	msgTlcreate    = 14
	msgTsymlink    = 16
	msgTmknod      = 18
	msgTrename     = 20
	msgTreadlink   = 22
	msgTgetattr    = 24
	msgTsetattr    = 26
	msgTxattrwalk  = 30
	msgTxattrcreat = 32
	msgTreaddir    = 40
	msgTfsync      = 50
	msgTlock       = 52
	msgTgetlock    = 54
	msgTlink       = 70
	msgTmkdir      = 72
	msgTrenameat   = 74
	msgTunlinkat   = 76
	msgTversion    = 100
	msgTauth       = 102
	msgTattach     = 104
	msgTflush      = 108
	msgTwalk       = 110
	msgTread       = 116
	msgTwrite      = 118
	msgTclunk      = 120
	msgTremove     = 122
)

const (
	hdrLen   = 7          // size[4] type[1] tag[2]
	ioHdrLen = 24         // P9_IOHDRSZ: what a Tread/Twrite leaves of msize for data
	rreadHdr = hdrLen + 4 // Rread: header and count[4], then the data
	maxWelem = 16         // MAXWELEM: names in one Twalk
	noTag    = 0xFFFF
	noFID    = 0xFFFFFFFF

	// maxMsize is the largest msize the server agrees to: two of Linux's
	// default 512 KiB fit the send buffer, and every connection's buffers
	// are sized by it.
	maxMsize = 1 << 20
	// minMsize is the smallest: below it a Rgetattr or a path does not fit.
	minMsize = 4096
)

// errMalformed is a frame whose body does not hold what its type needs.
var errMalformed = errors.New("malformed 9P message")

// request is one decoded T-message. Only the fields of its type are set;
// strings and data point into the frame the decoder was given, so a
// request lives no longer than its frame.
type request struct {
	typ byte
	tag uint16

	fid, newFID uint32 // newFID: Twalk; the target directory for Trename, Tlink, Trenameat
	names       []string
	name, name2 string // names of Tlcreate, Tmkdir, Tunlinkat; Trenameat's old/new; version; attach uname/aname
	offset      uint64
	count       uint32 // Tread, Treaddir
	msize       uint32
	flags       uint32 // open, unlinkat, lock flags
	oldTag      uint16
	data        []byte // Twrite's payload
	mask        uint64 // Tgetattr's request mask
	setMask     p9.SetAttrMask
	setAttr     p9.SetAttr
	lock        lockReq
}

// lockReq is the body of a Tlock or Tgetlock.
type lockReq struct {
	typ           p9.LockType
	start, length uint64
	pid           uint32
	client        string
}

// decoder reads a message body; the first short read sets err and makes
// every later read return zero.
type decoder struct {
	b   []byte
	err error
}

func (d *decoder) take(n int) []byte {
	if d.err != nil || len(d.b) < n {
		if d.err == nil {
			d.err = fmt.Errorf("%w: body ends %d bytes short", errMalformed, n-len(d.b))
		}
		d.b = nil
		return nil
	}
	p := d.b[:n]
	d.b = d.b[n:]
	return p
}

func (d *decoder) u8() uint8 {
	if p := d.take(1); p != nil {
		return p[0]
	}
	return 0
}

func (d *decoder) u16() uint16 {
	if p := d.take(2); p != nil {
		return binary.LittleEndian.Uint16(p)
	}
	return 0
}

func (d *decoder) u32() uint32 {
	if p := d.take(4); p != nil {
		return binary.LittleEndian.Uint32(p)
	}
	return 0
}

func (d *decoder) u64() uint64 {
	if p := d.take(8); p != nil {
		return binary.LittleEndian.Uint64(p)
	}
	return 0
}

func (d *decoder) str() string {
	n := int(d.u16())
	return string(d.take(n))
}

// decodeRequest decodes the body of a T-message of type typ. An unknown
// type is not an error here: the server answers it with ENOSYS.
func decodeRequest(typ byte, tag uint16, body []byte) (request, error) {
	r := request{typ: typ, tag: tag}
	d := decoder{b: body}
	switch typ {
	case msgTversion:
		r.msize, r.name = d.u32(), d.str()
	case msgTauth:
		r.fid, r.name, r.name2 = d.u32(), d.str(), d.str()
	case msgTattach:
		r.fid, r.newFID = d.u32(), d.u32() // newFID holds the afid
		r.name, r.name2 = d.str(), d.str()
		d.u32() // n_uname
	case msgTflush:
		r.oldTag = d.u16()
	case msgTwalk:
		r.fid, r.newFID = d.u32(), d.u32()
		n := int(d.u16())
		if n > maxWelem {
			return r, fmt.Errorf("%w: walk of %d names, at most %d", errMalformed, n, maxWelem)
		}
		if n > 0 {
			r.names = make([]string, n)
			for i := range r.names {
				r.names[i] = d.str()
			}
		}
	case msgTread:
		r.fid, r.offset, r.count = d.u32(), d.u64(), d.u32()
	case msgTwrite:
		r.fid, r.offset = d.u32(), d.u64()
		n := d.u32()
		if d.err == nil && uint64(n) > uint64(len(d.b)) {
			return r, fmt.Errorf("%w: write of %d bytes in a frame holding %d", errMalformed, n, len(d.b))
		}
		r.data = d.take(int(n))
	case msgTclunk, msgTremove, msgTstatfs, msgTreadlink:
		r.fid = d.u32()
	case msgTfsync:
		r.fid = d.u32() // Linux adds datasync[4]: both mean store the file
	case msgTlopen:
		r.fid, r.flags = d.u32(), d.u32()
	case msgTlcreate:
		r.fid, r.name, r.flags = d.u32(), d.str(), d.u32()
		d.u32() // mode
		d.u32() // gid
	case msgTmkdir:
		r.fid, r.name = d.u32(), d.str()
		d.u32() // mode
		d.u32() // gid
	case msgTgetattr:
		r.fid, r.mask = d.u32(), d.u64()
	case msgTsetattr:
		r.fid = d.u32()
		r.setMask = setAttrMask(d.u32())
		r.setAttr = p9.SetAttr{Permissions: p9.FileMode(d.u32()), UID: p9.UID(d.u32()), GID: p9.GID(d.u32()),
			Size: d.u64(), ATimeSeconds: d.u64(), ATimeNanoSeconds: d.u64(),
			MTimeSeconds: d.u64(), MTimeNanoSeconds: d.u64()}
	case msgTreaddir:
		r.fid, r.offset, r.count = d.u32(), d.u64(), d.u32()
	case msgTunlinkat:
		r.fid, r.name, r.flags = d.u32(), d.str(), d.u32()
	case msgTrenameat:
		r.fid, r.name, r.newFID, r.name2 = d.u32(), d.str(), d.u32(), d.str()
	case msgTrename:
		r.fid, r.newFID, r.name = d.u32(), d.u32(), d.str()
	case msgTlock:
		r.fid = d.u32()
		r.lock.typ = p9.LockType(d.u8())
		r.flags = d.u32()
		r.lock.start, r.lock.length, r.lock.pid, r.lock.client = d.u64(), d.u64(), d.u32(), d.str()
	case msgTgetlock:
		r.fid = d.u32()
		r.lock.typ = p9.LockType(d.u8())
		r.lock.start, r.lock.length, r.lock.pid, r.lock.client = d.u64(), d.u64(), d.u32(), d.str()
	default:
		// Tsymlink, Tmknod, Tlink, xattrs and anything unknown: refused
		// by type, so their bodies are never read.
	}
	if d.err != nil {
		return r, fmt.Errorf("message type %d: %w", typ, d.err)
	}
	return r, nil
}

func setAttrMask(m uint32) p9.SetAttrMask {
	return p9.SetAttrMask{Permissions: m&0x1 != 0, UID: m&0x2 != 0, GID: m&0x4 != 0, Size: m&0x8 != 0,
		ATime: m&0x10 != 0, MTime: m&0x20 != 0, CTime: m&0x40 != 0,
		ATimeNotSystemTime: m&0x80 != 0, MTimeNotSystemTime: m&0x100 != 0}
}

func attrMaskBits(a p9.AttrMask) uint64 {
	var m uint64
	for i, set := range []bool{a.Mode, a.NLink, a.UID, a.GID, a.RDev, a.ATime, a.MTime, a.CTime,
		a.INo, a.Size, a.Blocks, a.BTime, a.Gen, a.DataVersion} {
		if set {
			m |= 1 << i
		}
	}
	return m
}

// reply builds one R-message in a buffer the connection reuses.
type reply []byte

// start begins an R-message answering tag; finish fills in its size.
func (r reply) start(typ byte, tag uint16) reply {
	r = append(r[:0], 0, 0, 0, 0, typ)
	return binary.LittleEndian.AppendUint16(r, tag)
}

func (r reply) finish() reply {
	binary.LittleEndian.PutUint32(r, uint32(len(r)))
	return r
}

func (r reply) u8(v uint8) reply   { return append(r, v) }
func (r reply) u16(v uint16) reply { return binary.LittleEndian.AppendUint16(r, v) }
func (r reply) u32(v uint32) reply { return binary.LittleEndian.AppendUint32(r, v) }
func (r reply) u64(v uint64) reply { return binary.LittleEndian.AppendUint64(r, v) }

func (r reply) str(s string) reply {
	return append(r.u16(uint16(len(s))), s...)
}

func (r reply) qid(q p9.QID) reply {
	return r.u8(uint8(q.Type)).u32(q.Version).u64(q.Path)
}

// rlerror is the reply to any request that failed.
func (r reply) rlerror(tag uint16, errno uint32) reply {
	return r.start(msgRlerror, tag).u32(errno).finish()
}

func (r reply) attr(q p9.QID, valid p9.AttrMask, a p9.Attr) reply {
	r = r.u64(attrMaskBits(valid)).qid(q).u32(uint32(a.Mode)).u32(uint32(a.UID)).u32(uint32(a.GID))
	r = r.u64(uint64(a.NLink)).u64(uint64(a.RDev)).u64(a.Size).u64(a.BlockSize).u64(a.Blocks)
	r = r.u64(a.ATimeSeconds).u64(a.ATimeNanoSeconds).u64(a.MTimeSeconds).u64(a.MTimeNanoSeconds)
	r = r.u64(a.CTimeSeconds).u64(a.CTimeNanoSeconds).u64(a.BTimeSeconds).u64(a.BTimeNanoSeconds)
	return r.u64(a.Gen).u64(a.DataVersion)
}

func (r reply) statfs(s p9.FSStat) reply {
	return r.u32(s.Type).u32(s.BlockSize).u64(s.Blocks).u64(s.BlocksFree).u64(s.BlocksAvailable).
		u64(s.Files).u64(s.FilesFree).u64(s.FSID).u32(s.NameLength)
}

// dirents appends as many entries as fit in max bytes, after a count[4]
// that says how many bytes they took.
func (r reply) dirents(ents p9.Dirents, max int) reply {
	at := len(r)
	r = r.u32(0)
	for _, e := range ents {
		if len(r)-at-4+13+8+1+2+len(e.Name) > max {
			break
		}
		r = r.qid(e.QID).u64(e.Offset).u8(uint8(e.Type)).str(e.Name)
	}
	binary.LittleEndian.PutUint32(r[at:], uint32(len(r)-at-4))
	return r
}
