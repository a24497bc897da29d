package hsm

import (
	"errors"
	"fmt"
	"strings"
)

// URI is the part of an RFC 7512 PKCS#11 URI that names the master
// key: the token that holds it and the key object's label. Other path
// attributes narrow the token (serial, manufacturer, model) and are
// checked against the token found.
type URI struct {
	Token        string // CKA_LABEL of the token (token=), required
	Object       string // CKA_LABEL of the key object (object=), required
	ID           []byte // CKA_ID (id=), optional
	Serial       string // token serial number (serial=), optional
	Manufacturer string // token manufacturer ID (manufacturer=), optional
	Model        string // token model (model=), optional
	// ModulePath is the query attribute module-path, if given;
	// --pkcs11-module takes precedence.
	ModulePath string
	// PINSource is the query attribute pin-source, if given (a file: URI
	// or path); --pkcs11-pin-file takes precedence.
	PINSource string
}

// ErrURI marks a --master-key-pkcs11 value that is not a usable
// PKCS#11 URI; the error text names the problem.
var ErrURI = errors.New("bad PKCS#11 URI")

// The attributes RFC 7512 defines (section 2.3). Unknown ones are refused
// rather than ignored: a misspelt "objekt=" must not select another key.
// Vendor attributes ("x-…") are accepted and ignored, as the RFC allows.
var (
	pathAttrs = map[string]bool{
		"token": true, "manufacturer": true, "serial": true, "model": true,
		"library-manufacturer": true, "library-description": true, "library-version": true,
		"object": true, "type": true, "id": true,
		"slot-description": true, "slot-manufacturer": true, "slot-id": true,
	}
	queryAttrs = map[string]bool{"pin-source": true, "pin-value": true, "module-name": true, "module-path": true}
)

// ParseURI parses s as an RFC 7512 PKCS#11 URI naming an AES key
// object: "pkcs11:token=LABEL;object=NAME". Values are percent-decoded.
// token and object are required; type, if given, must be secret-key. A PIN
// in the URI (pin-value) is refused: it would show in process listings and
// shell history; give --pkcs11-pin-file instead.
func ParseURI(s string) (URI, error) {
	var u URI
	rest, ok := strings.CutPrefix(s, "pkcs11:")
	if !ok {
		// The scheme is case-insensitive (RFC 3986 3.1).
		if len(s) >= 7 && strings.EqualFold(s[:7], "pkcs11:") {
			rest = s[7:]
		} else {
			return u, fmt.Errorf("%w: %q does not start with \"pkcs11:\" (write pkcs11:token=LABEL;object=NAME)", ErrURI, trunc(s))
		}
	}
	path, query, _ := strings.Cut(rest, "?")
	seen := map[string]bool{}
	if path != "" {
		for _, a := range strings.Split(path, ";") {
			name, val, err := attr(a, false)
			if err != nil {
				return u, err
			}
			if !pathAttrs[name] && !strings.HasPrefix(name, "x-") {
				return u, fmt.Errorf("%w: unknown path attribute %q (RFC 7512 defines token, object, type, id, serial, manufacturer, model, library-*, slot-*)", ErrURI, trunc(name))
			}
			if seen[name] {
				return u, fmt.Errorf("%w: attribute %q appears twice", ErrURI, name)
			}
			seen[name] = true
			switch name {
			case "token":
				u.Token = val
			case "object":
				u.Object = val
			case "id":
				u.ID = []byte(val)
			case "serial":
				u.Serial = val
			case "manufacturer":
				u.Manufacturer = val
			case "model":
				u.Model = val
			case "type":
				if val != "secret-key" {
					return u, fmt.Errorf("%w: type=%q: the master key is an AES key, type=secret-key", ErrURI, trunc(val))
				}
			}
		}
	}
	if query != "" {
		for _, a := range strings.Split(query, "&") {
			name, val, err := attr(a, true)
			if err != nil {
				return u, err
			}
			if !queryAttrs[name] && !strings.HasPrefix(name, "x-") {
				return u, fmt.Errorf("%w: unknown query attribute %q (RFC 7512 defines pin-source, pin-value, module-name, module-path)", ErrURI, trunc(name))
			}
			if seen["?"+name] {
				return u, fmt.Errorf("%w: attribute %q appears twice", ErrURI, name)
			}
			seen["?"+name] = true
			switch name {
			case "pin-value":
				return u, fmt.Errorf("%w: a PIN in the URI (pin-value) would show in process listings; put it in a 0600 file and pass --pkcs11-pin-file", ErrURI)
			case "pin-source":
				u.PINSource = val
			case "module-path":
				u.ModulePath = val
			}
		}
	}
	switch {
	case u.Token == "":
		return u, fmt.Errorf("%w: no token= attribute (name the token by its label: pkcs11:token=LABEL;object=NAME)", ErrURI)
	case u.Object == "":
		return u, fmt.Errorf("%w: no object= attribute (name the master key object: pkcs11:token=LABEL;object=NAME)", ErrURI)
	}
	return u, nil
}

// attr splits and percent-decodes one "name=value" attribute. Characters
// outside the RFC's pchar sets must be percent-encoded.
func attr(a string, query bool) (name, val string, err error) {
	name, raw, ok := strings.Cut(a, "=")
	if !ok || name == "" {
		return "", "", fmt.Errorf("%w: attribute %q is not name=value", ErrURI, trunc(a))
	}
	for i := 0; i < len(name); i++ {
		c := name[i]
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-') {
			return "", "", fmt.Errorf("%w: attribute name %q: only lower-case letters, digits and '-'", ErrURI, trunc(name))
		}
	}
	var b strings.Builder
	for i := 0; i < len(raw); i++ {
		c := raw[i]
		switch {
		case c == '%':
			if i+2 >= len(raw) {
				return "", "", fmt.Errorf("%w: attribute %s: truncated percent-encoding", ErrURI, name)
			}
			hi, lo := unhex(raw[i+1]), unhex(raw[i+2])
			if hi < 0 || lo < 0 {
				return "", "", fmt.Errorf("%w: attribute %s: %q is not a percent-encoded byte", ErrURI, name, raw[i:i+3])
			}
			b.WriteByte(byte(hi<<4 | lo))
			i += 2
		case allowed(c, query):
			b.WriteByte(c)
		default:
			return "", "", fmt.Errorf("%w: attribute %s: character %q must be percent-encoded (as %%%02X)", ErrURI, name, c, c)
		}
	}
	return name, b.String(), nil
}

func allowed(c byte, query bool) bool {
	switch {
	case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9':
		return true
	case strings.IndexByte("-._~:[]@!$'()*+,=", c) >= 0:
		return true
	case !query && c == '&':
		return true
	case query && (c == '/' || c == '?' || c == '|'):
		return true
	}
	return false
}

func unhex(c byte) int {
	switch {
	case c >= '0' && c <= '9':
		return int(c - '0')
	case c >= 'a' && c <= 'f':
		return int(c-'a') + 10
	case c >= 'A' && c <= 'F':
		return int(c-'A') + 10
	}
	return -1
}

// trunc keeps error messages short for long outside input.
func trunc(s string) string {
	if len(s) > 64 {
		return s[:64] + "…"
	}
	return s
}
