package keysvc

import (
	"encoding/base64"
	"unicode/utf8"

	"github.com/keygate/keygate/keysvc/api"
)

// decodeUnlockFast decodes the plain shape of an unlock or provision
// request, {"challenge":"…","attestation":"…"} with the two fields once
// each, in either order, and JSON whitespace between tokens, where neither
// string holds an escape or a control character and the challenge is valid
// UTF-8. For anything else it reports false and leaves u alone, and
// DecodeJSON decodes (or refuses) the body the general way. What it accepts
// it decodes exactly as encoding/json does (FuzzUnlockFastPath compares
// the two).
//
// It exists because encoding/json scans the attestation's kilobytes of
// base64 byte by byte twice (once to find the value's end, once to decode
// it), a visible share of an unlock's CPU.
func decodeUnlockFast(data []byte, u *api.UnlockRequest) bool {
	p := data
	skipSpace := func() {
		for len(p) > 0 && (p[0] == ' ' || p[0] == '\t' || p[0] == '\n' || p[0] == '\r') {
			p = p[1:]
		}
	}
	punct := func(c byte) bool {
		skipSpace()
		if len(p) > 0 && p[0] == c {
			p = p[1:]
			return true
		}
		return false
	}
	str := func() ([]byte, bool) {
		if !punct('"') {
			return nil, false
		}
		for i, c := range p {
			switch {
			case c == '"':
				s := p[:i]
				p = p[i+1:]
				return s, true
			case c == '\\' || c < 0x20:
				return nil, false
			}
		}
		return nil, false
	}
	var challenge, att []byte
	var haveChallenge, haveAtt bool
	if !punct('{') {
		return false
	}
	for i := range 2 {
		if i == 1 && !punct(',') {
			return false
		}
		key, ok := str()
		if !ok || !punct(':') {
			return false
		}
		val, ok := str()
		if !ok {
			return false
		}
		switch string(key) {
		case "challenge":
			if haveChallenge {
				return false
			}
			challenge, haveChallenge = val, true
		case "attestation":
			if haveAtt {
				return false
			}
			att, haveAtt = val, true
		default:
			return false
		}
	}
	if !punct('}') {
		return false
	}
	skipSpace()
	if len(p) != 0 || !utf8.Valid(challenge) {
		return false
	}
	dec := make([]byte, base64.StdEncoding.DecodedLen(len(att)))
	n, err := base64.StdEncoding.Decode(dec, att)
	if err != nil {
		return false
	}
	u.Challenge, u.Attestation = string(challenge), dec[:n]
	return true
}
