package nbd

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// Wire constants, as the NBD project's proto.md names them. Only what this
// server speaks or must refuse by name is here.
const (
	magicInit      = 0x4e42444d41474943 // "NBDMAGIC"
	magicOpt       = 0x49484156454f5054 // "IHAVEOPT"
	magicOptReply  = 0x0003e889045565a9
	magicRequest   = 0x25609513
	magicReply     = 0x67446698
	requestHdrSize = 28
	replyHdrSize   = 16

	flagFixedNewstyle = 1 << 0 // handshake flags, both directions
	flagNoZeroes      = 1 << 1

	optExportName = 1
	optAbort      = 2
	optList       = 3
	optStartTLS   = 5
	optInfo       = 6
	optGo         = 7

	repAck         = 1
	repServer      = 2
	repInfo        = 3
	repFlagError   = 1 << 31
	repErrUnsup    = repFlagError | 1
	repErrPolicy   = repFlagError | 2
	repErrInvalid  = repFlagError | 3
	repErrUnknown  = repFlagError | 6
	repErrShutdown = repFlagError | 7

	infoExport    = 0
	infoBlockSize = 3

	// Transmission flags.
	FlagHasFlags       = 1 << 0
	FlagReadOnly       = 1 << 1
	FlagSendFlush      = 1 << 2
	FlagSendFUA        = 1 << 3
	FlagSendTrim       = 1 << 5
	FlagSendWriteZeros = 1 << 6
	FlagCanMultiConn   = 1 << 8

	// Command types.
	CmdRead        = 0
	CmdWrite       = 1
	CmdDisc        = 2
	CmdFlush       = 3
	CmdTrim        = 4
	CmdCache       = 5
	CmdWriteZeroes = 6
	CmdBlockStatus = 7

	// Command flags.
	CmdFlagFUA    = 1 << 0
	CmdFlagNoHole = 1 << 1

	// Errors, as errno values the protocol carries.
	errPerm  = 1
	errIO    = 5
	errInval = 22
	errNoSpc = 28
)

// maxOptionLen bounds an option's data. The longest legitimate one here is
// NBD_OPT_GO: a name (at most 4096 bytes by proto.md) and a few info types.
const maxOptionLen = 4096 + 64

// Request is one transmission-phase request header.
type Request struct {
	Flags  uint16
	Type   uint16
	Cookie uint64
	Offset uint64
	Length uint32
}

// errBadMagic is why a connection is closed on a request that is not one.
var errBadMagic = errors.New("bad request magic")

// ParseRequest decodes a 28-byte request header. It checks only the magic:
// what the fields may hold depends on the export and is the server's job.
func ParseRequest(b []byte) (Request, error) {
	if len(b) < requestHdrSize {
		return Request{}, fmt.Errorf("request header: %d bytes, need %d", len(b), requestHdrSize)
	}
	if m := binary.BigEndian.Uint32(b); m != magicRequest {
		return Request{}, fmt.Errorf("%w 0x%08x", errBadMagic, m)
	}
	return Request{
		Flags:  binary.BigEndian.Uint16(b[4:]),
		Type:   binary.BigEndian.Uint16(b[6:]),
		Cookie: binary.BigEndian.Uint64(b[8:]),
		Offset: binary.BigEndian.Uint64(b[16:]),
		Length: binary.BigEndian.Uint32(b[24:]),
	}, nil
}

// Marshal encodes r as a 28-byte request header.
func (r Request) Marshal() []byte {
	b := make([]byte, requestHdrSize)
	binary.BigEndian.PutUint32(b, magicRequest)
	binary.BigEndian.PutUint16(b[4:], r.Flags)
	binary.BigEndian.PutUint16(b[6:], r.Type)
	binary.BigEndian.PutUint64(b[8:], r.Cookie)
	binary.BigEndian.PutUint64(b[16:], r.Offset)
	binary.BigEndian.PutUint32(b[24:], r.Length)
	return b
}

func putReply(b []byte, errno uint32, cookie uint64) {
	binary.BigEndian.PutUint32(b, magicReply)
	binary.BigEndian.PutUint32(b[4:], errno)
	binary.BigEndian.PutUint64(b[8:], cookie)
}
