package luks2

import (
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net/url"
	"strings"
)

// Token is a LUKS2 token: a typed record that names keyslots and carries
// whatever its type needs. Fields holds every member other than "type" and
// "keyslots", as raw JSON, so tokens of other tools survive a rewrite.
type Token struct {
	Type     string
	Keyslots []int
	Fields   map[string]json.RawMessage
}

// Tokens returns the volume's tokens by id.
func (v *Volume) Tokens() map[int]Token {
	out := make(map[int]Token, len(v.meta.Tokens))
	for _, id := range sortedIDs(v.meta.Tokens) {
		out[id] = tokenFromJSON(v.meta.Tokens[itoa(id)])
	}
	return out
}

func tokenFromJSON(t *jsonToken) Token {
	out := Token{Type: t.Type, Fields: map[string]json.RawMessage{}}
	for _, s := range t.Keyslots {
		if n, err := parseID(s, maxKeyslots); err == nil {
			out.Keyslots = append(out.Keyslots, n)
		}
	}
	for k, x := range t.extra {
		out.Fields[k] = append(json.RawMessage(nil), x...)
	}
	return out
}

func (v *Volume) tokenToJSON(t Token) (*jsonToken, error) {
	if t.Type == "" {
		return nil, fmt.Errorf("token has no type")
	}
	if strings.HasPrefix(t.Type, "luks2-") && t.Type != "luks2-keyring" {
		return nil, fmt.Errorf("token type %q: the luks2- prefix is reserved for cryptsetup's built-in tokens", t.Type)
	}
	jt := &jsonToken{Type: t.Type, Keyslots: []string{}, extra: map[string]json.RawMessage{}}
	for _, n := range t.Keyslots {
		if _, ok := v.meta.Keyslots[itoa(n)]; !ok {
			return nil, fmt.Errorf("token names keyslot %d, which does not exist", n)
		}
		jt.Keyslots = append(jt.Keyslots, itoa(n))
	}
	for k, x := range t.Fields {
		if k == "type" || k == "keyslots" {
			return nil, fmt.Errorf("token field %q must be set through Token.%s", k, map[string]string{"type": "Type", "keyslots": "Keyslots"}[k])
		}
		if !json.Valid(x) {
			return nil, fmt.Errorf("token field %q is not valid JSON", k)
		}
		jt.extra[k] = append(json.RawMessage(nil), x...)
	}
	return jt, nil
}

// SetToken writes token id (0 to 31), replacing any token with that id.
func (v *Volume) SetToken(id int, t Token) error {
	if id < 0 || id >= maxTokens {
		return fmt.Errorf("token id %d: use 0 to %d", id, maxTokens-1)
	}
	if err := v.meta.checkRequirements("write a token"); err != nil {
		return err
	}
	jt, err := v.tokenToJSON(t)
	if err != nil {
		return err
	}
	m := v.meta.clone()
	m.Tokens[itoa(id)] = jt
	return v.commit(m)
}

// AddToken writes t under the lowest free token id and returns the id.
func (v *Volume) AddToken(t Token) (int, error) {
	for id := 0; id < maxTokens; id++ {
		if _, used := v.meta.Tokens[itoa(id)]; !used {
			return id, v.SetToken(id, t)
		}
	}
	return -1, fmt.Errorf("all %d token ids are in use (remove one first): %w", maxTokens, ErrNoSpace)
}

// RemoveToken deletes token id.
func (v *Volume) RemoveToken(id int) error {
	if _, ok := v.meta.Tokens[itoa(id)]; !ok {
		return fmt.Errorf("token %d does not exist", id)
	}
	if err := v.meta.checkRequirements("remove a token"); err != nil {
		return err
	}
	m := v.meta.clone()
	delete(m.Tokens, itoa(id))
	return v.commit(m)
}

// KeygateTokenType is the LUKS2 token type of keygate's key-service token.
const KeygateTokenType = "keygate"

// KeygateToken names the keyslot whose passphrase is the volume's unwrap
// key (UK) held by the key service, and says how to reach that service.
// On disk: {"type":"keygate","keyslots":["N"],"keygate_url":URL,
// "keygate_volume":ID,"keygate_ca_sha256":HEX}, plus
// "keygate_urls":[URL,MORE…] when the service has several replicas (a
// reader that knows only keygate_url still finds the first).
type KeygateToken struct {
	Keyslot int    // the keyslot the UK opens
	URL     string // key service base URL, https (the first replica)
	// MoreURLs are further replicas of the same service, tried after URL
	// in this order; empty for a single service.
	MoreURLs []string
	VolumeID string // the volume's id at the key service
	CASHA256 string // lowercase hex SHA-256 of the service CA certificate (DER)
}

// URLs are the service's base URLs in the order a VM tries them.
func (k KeygateToken) URLs() []string { return append([]string{k.URL}, k.MoreURLs...) }

func (k KeygateToken) check() error {
	seen := map[string]bool{}
	for _, s := range k.URLs() {
		u, err := url.Parse(s)
		if err != nil || u.Scheme != "https" || u.Host == "" || strings.Contains(s, ",") {
			return fmt.Errorf("keygate token: url %q must be an https URL", s)
		}
		if seen[s] {
			return fmt.Errorf("keygate token: url %q is listed twice", s)
		}
		seen[s] = true
	}
	if k.VolumeID == "" {
		return fmt.Errorf("keygate token: empty volume id")
	}
	if b, err := hex.DecodeString(k.CASHA256); err != nil || len(b) != 32 || strings.ToLower(k.CASHA256) != k.CASHA256 {
		return fmt.Errorf("keygate token: CA fingerprint must be 64 lowercase hex digits (sha256 of the CA certificate)")
	}
	return nil
}

// Token renders k as a generic Token for SetToken/AddToken.
func (k KeygateToken) Token() (Token, error) {
	if err := k.check(); err != nil {
		return Token{}, err
	}
	f := map[string]json.RawMessage{}
	for name, s := range map[string]string{"keygate_url": k.URL, "keygate_volume": k.VolumeID, "keygate_ca_sha256": k.CASHA256} {
		b, _ := json.Marshal(s)
		f[name] = b
	}
	if len(k.MoreURLs) > 0 {
		f["keygate_urls"], _ = json.Marshal(k.URLs())
	}
	return Token{Type: KeygateTokenType, Keyslots: []int{k.Keyslot}, Fields: f}, nil
}

// ParseKeygateToken reads a keygate token.
func ParseKeygateToken(t Token) (KeygateToken, error) {
	if t.Type != KeygateTokenType {
		return KeygateToken{}, fmt.Errorf("token type %q is not %q", t.Type, KeygateTokenType)
	}
	if len(t.Keyslots) != 1 {
		return KeygateToken{}, fmt.Errorf("keygate token names %d keyslots, want exactly 1", len(t.Keyslots))
	}
	k := KeygateToken{Keyslot: t.Keyslots[0]}
	for name, dst := range map[string]*string{"keygate_url": &k.URL, "keygate_volume": &k.VolumeID, "keygate_ca_sha256": &k.CASHA256} {
		if err := json.Unmarshal(t.Fields[name], dst); err != nil {
			return KeygateToken{}, fmt.Errorf("keygate token: field %s missing or not a string", name)
		}
	}
	if raw, ok := t.Fields["keygate_urls"]; ok {
		var urls []string
		if err := json.Unmarshal(raw, &urls); err != nil || len(urls) == 0 {
			return KeygateToken{}, fmt.Errorf("keygate token: keygate_urls must be a non-empty list of URLs")
		}
		if urls[0] != k.URL {
			return KeygateToken{}, fmt.Errorf("keygate token: keygate_urls starts with %q, not keygate_url %q", urls[0], k.URL)
		}
		k.MoreURLs = urls[1:]
	}
	return k, k.check()
}

// FindKeygateToken returns the lowest-id keygate token of the volume.
func (v *Volume) FindKeygateToken() (int, KeygateToken, error) {
	for _, id := range sortedIDs(v.meta.Tokens) {
		if t := v.meta.Tokens[itoa(id)]; t.Type == KeygateTokenType {
			k, err := ParseKeygateToken(tokenFromJSON(t))
			return id, k, err
		}
	}
	return -1, KeygateToken{}, fmt.Errorf("the volume has no keygate token (add one with SetToken)")
}
