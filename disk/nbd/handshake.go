package nbd

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// errAbort ends a handshake the client ended on purpose (NBD_OPT_ABORT, or
// a close before any option): not worth a log line.
var errAbort = errors.New("client ended the handshake")

// handshake runs the fixed-newstyle negotiation on rw until the client
// asks for the export (NBD_OPT_GO or NBD_OPT_EXPORT_NAME), and returns
// then; any other outcome is an error and the connection is to be closed.
func (s *Server) handshake(rw io.ReadWriter) error {
	var hello [18]byte
	binary.BigEndian.PutUint64(hello[0:], magicInit)
	binary.BigEndian.PutUint64(hello[8:], magicOpt)
	binary.BigEndian.PutUint16(hello[16:], flagFixedNewstyle|flagNoZeroes)
	if _, err := rw.Write(hello[:]); err != nil {
		return fmt.Errorf("send greeting: %w", err)
	}
	var cf [4]byte
	if _, err := io.ReadFull(rw, cf[:]); err != nil {
		return fmt.Errorf("read client flags: %w", errAbortIfEOF(err))
	}
	clientFlags := binary.BigEndian.Uint32(cf[:])
	if clientFlags&^(flagFixedNewstyle|flagNoZeroes) != 0 {
		return fmt.Errorf("client flags 0x%x: unknown bits set", clientFlags)
	}
	noZeroes := clientFlags&flagNoZeroes != 0
	fixed := clientFlags&flagFixedNewstyle != 0

	var hdr [16]byte
	for {
		if _, err := io.ReadFull(rw, hdr[:]); err != nil {
			return fmt.Errorf("read option: %w", errAbortIfEOF(err))
		}
		if m := binary.BigEndian.Uint64(hdr[:]); m != magicOpt {
			return fmt.Errorf("option magic 0x%x is not IHAVEOPT", m)
		}
		opt := binary.BigEndian.Uint32(hdr[8:])
		n := binary.BigEndian.Uint32(hdr[12:])
		if n > maxOptionLen {
			return fmt.Errorf("option %d: %d bytes of data, at most %d are accepted", opt, n, maxOptionLen)
		}
		data := make([]byte, n)
		if _, err := io.ReadFull(rw, data); err != nil {
			return fmt.Errorf("read option %d: %w", opt, err)
		}
		if !fixed && opt != optExportName {
			// Without fixed newstyle the client cannot read error
			// replies; proto.md says to close.
			return fmt.Errorf("option %d from a client without fixed newstyle", opt)
		}
		switch opt {
		case optExportName:
			if !s.knownName(string(data)) {
				return fmt.Errorf("NBD_OPT_EXPORT_NAME: no export named %q", data)
			}
			reply := make([]byte, 10, 10+124)
			binary.BigEndian.PutUint64(reply, uint64(s.size))
			binary.BigEndian.PutUint16(reply[8:], s.flags)
			if !noZeroes {
				reply = reply[:10+124]
			}
			if _, err := rw.Write(reply); err != nil {
				return fmt.Errorf("send export: %w", err)
			}
			return nil
		case optAbort:
			s.optReply(rw, opt, repAck, nil)
			return errAbort
		case optList:
			if n != 0 {
				if err := s.optReply(rw, opt, repErrInvalid, []byte("NBD_OPT_LIST takes no data")); err != nil {
					return err
				}
				continue
			}
			name := []byte(s.opts.Name)
			entry := binary.BigEndian.AppendUint32(nil, uint32(len(name)))
			if err := s.optReply(rw, opt, repServer, append(entry, name...)); err != nil {
				return err
			}
			if err := s.optReply(rw, opt, repAck, nil); err != nil {
				return err
			}
		case optInfo, optGo:
			done, err := s.infoOrGo(rw, opt, data)
			if err != nil || done {
				return err
			}
		case optStartTLS:
			// The export is a unix socket guarded by its mode and peer
			// credentials; there is nothing for TLS to add.
			if err := s.optReply(rw, opt, repErrPolicy, []byte("TLS is not offered on a local unix socket")); err != nil {
				return err
			}
		default:
			if err := s.optReply(rw, opt, repErrUnsup, []byte(fmt.Sprintf("option %d is not supported", opt))); err != nil {
				return err
			}
		}
	}
}

// infoOrGo answers NBD_OPT_INFO and NBD_OPT_GO; done means GO succeeded
// and transmission starts.
func (s *Server) infoOrGo(rw io.Writer, opt uint32, data []byte) (done bool, err error) {
	name, infos, perr := parseInfoRequest(data)
	if perr != nil {
		return false, s.optReply(rw, opt, repErrInvalid, []byte(perr.Error()))
	}
	if !s.knownName(name) {
		return false, s.optReply(rw, opt, repErrUnknown, []byte(fmt.Sprintf("no export named %q", name)))
	}
	if s.closing() {
		return false, s.optReply(rw, opt, repErrShutdown, []byte("the export is shutting down"))
	}
	exp := make([]byte, 12)
	binary.BigEndian.PutUint16(exp, infoExport)
	binary.BigEndian.PutUint64(exp[2:], uint64(s.size))
	binary.BigEndian.PutUint16(exp[10:], s.flags)
	if err := s.optReply(rw, opt, repInfo, exp); err != nil {
		return false, err
	}
	for _, t := range infos {
		if t != infoBlockSize {
			continue // name and description are optional to answer
		}
		bs := make([]byte, 14)
		binary.BigEndian.PutUint16(bs, infoBlockSize)
		binary.BigEndian.PutUint32(bs[2:], s.opts.MinBlock)
		binary.BigEndian.PutUint32(bs[6:], s.opts.PreferredBlock)
		binary.BigEndian.PutUint32(bs[10:], s.opts.MaxRequest)
		if err := s.optReply(rw, opt, repInfo, bs); err != nil {
			return false, err
		}
	}
	if err := s.optReply(rw, opt, repAck, nil); err != nil {
		return false, err
	}
	return opt == optGo, nil
}

// parseInfoRequest splits NBD_OPT_INFO/GO data: a 32-bit name length, the
// name, a 16-bit count and that many 16-bit info types.
func parseInfoRequest(b []byte) (name string, infos []uint16, err error) {
	if len(b) < 4 {
		return "", nil, errors.New("option data too short for a name length")
	}
	nl := binary.BigEndian.Uint32(b)
	if uint64(nl) > uint64(len(b)-4) {
		return "", nil, fmt.Errorf("name length %d runs past the option's %d bytes", nl, len(b))
	}
	name, b = string(b[4:4+nl]), b[4+nl:]
	if len(b) < 2 {
		return "", nil, errors.New("option data too short for the info count")
	}
	cnt := int(binary.BigEndian.Uint16(b))
	b = b[2:]
	if len(b) != 2*cnt {
		return "", nil, fmt.Errorf("%d info requests announced, %d bytes follow", cnt, len(b))
	}
	for i := range cnt {
		infos = append(infos, binary.BigEndian.Uint16(b[2*i:]))
	}
	return name, infos, nil
}

func (s *Server) optReply(w io.Writer, opt, typ uint32, data []byte) error {
	b := make([]byte, 20, 20+len(data))
	binary.BigEndian.PutUint64(b, magicOptReply)
	binary.BigEndian.PutUint32(b[8:], opt)
	binary.BigEndian.PutUint32(b[12:], typ)
	binary.BigEndian.PutUint32(b[16:], uint32(len(data)))
	if _, err := w.Write(append(b, data...)); err != nil {
		return fmt.Errorf("send option reply: %w", err)
	}
	return nil
}

// knownName accepts the default export ("") and the configured name.
func (s *Server) knownName(n string) bool { return n == "" || n == s.opts.Name }

func errAbortIfEOF(err error) error {
	if errors.Is(err, io.EOF) {
		return errAbort
	}
	return err
}
