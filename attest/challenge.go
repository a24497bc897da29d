package attest

import (
	"crypto"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"fmt"
	"strings"
	"time"
)

// Sentinel errors of challenge tokens. Check and Redeem wrap exactly one of
// them, so that the key service can branch with errors.Is.
var (
	// ErrChallengeMalformed: the string is not a keygate challenge token.
	ErrChallengeMalformed = errors.New("challenge token malformed")
	// ErrChallengeMAC: the token was not issued under this key (tampered,
	// forged, or issued by another key service).
	ErrChallengeMAC = errors.New("challenge token MAC invalid")
	// ErrChallengeBinding: the token was issued for another VM, volume, EK or AK.
	ErrChallengeBinding = errors.New("challenge token bound to another vm, volume, EK or AK")
	// ErrChallengeExpired: the token's expiry has passed.
	ErrChallengeExpired = errors.New("challenge token expired")
	// ErrChallengeReplayed: the token was already redeemed once.
	ErrChallengeReplayed = errors.New("challenge token already used")
)

const (
	tokenVersion = "v1"
	// NonceSize is the size of the nonce a challenge carries; the VM passes
	// it to TPM2_Quote as qualifying data.
	NonceSize = 32
	// MinKeySize is the smallest MAC key NewChallenger accepts.
	MinKeySize = 32
	// DefaultChallengeTTL is how long a challenge stays valid by default.
	DefaultChallengeTTL = 2 * time.Minute
	// macSize is the HMAC-SHA256 output size.
	macSize = sha256.Size
	// maxTokenLen bounds the work Check does on outside strings.
	maxTokenLen = 4096
	// maxNameLen bounds the vm and volume names carried in a token.
	maxNameLen = 1024
	// fixedPayload is the size of the fixed part of a v1 payload:
	// issued(8) expiry(8) nonce(32) ek(32) ak(32) vmlen(2) vollen(2).
	fixedPayload = 8 + 8 + NonceSize + sha256.Size + sha256.Size + 2 + 2
)

// macLabel separates challenge MACs from any other use of the same key.
var macLabel = []byte("keygate challenge token v1\x00")

// Claims is what a valid challenge token says. Check returns it only after
// the MAC, the binding and the expiry were checked.
type Claims struct {
	VM, Volume string
	// EK and AK are SHA-256 fingerprints of the PKIX (DER) public keys.
	EK, AK [sha256.Size]byte
	// Nonce is the value the quote must carry as qualifying data.
	Nonce    []byte
	IssuedAt time.Time
	Expiry   time.Time
}

// ID names the challenge for a ReplayCache: the nonce, which is random and
// unique per token.
func (c Claims) ID() []byte { return c.Nonce }

// ReplayCache remembers redeemed challenges until they expire. The key
// service backs it with its store so that any replica refuses a replay; use
// NewMemReplayCache for a single replica and in tests.
type ReplayCache interface {
	// Use records id as used until expiry. fresh is true the first time an
	// id is used and false on any later call before expiry. An error means
	// the use could not be recorded; callers must then refuse the challenge.
	Use(id []byte, expiry time.Time) (fresh bool, err error)
}

// Challenger issues and checks challenge tokens under one MAC key. It is
// safe for concurrent use.
type Challenger struct {
	key   []byte
	ttl   time.Duration
	now   func() time.Time
	cache ReplayCache
	rand  func([]byte) error
}

// ChallengerOption configures a Challenger.
type ChallengerOption func(*Challenger)

// WithTTL sets how long issued challenges stay valid (DefaultChallengeTTL
// otherwise).
func WithTTL(d time.Duration) ChallengerOption { return func(c *Challenger) { c.ttl = d } }

// WithClock sets the clock Issue stamps tokens with (time.Now otherwise).
func WithClock(now func() time.Time) ChallengerOption { return func(c *Challenger) { c.now = now } }

// WithReplayCache sets the cache Redeem records used challenges in.
func WithReplayCache(rc ReplayCache) ChallengerOption {
	return func(c *Challenger) { c.cache = rc }
}

// NewChallenger returns a Challenger that MACs tokens with HMAC-SHA256 under
// key. The key service derives key from its master key, so that every
// replica checks every token. key is copied; the caller may wipe its copy.
func NewChallenger(key []byte, opts ...ChallengerOption) (*Challenger, error) {
	if len(key) < MinKeySize {
		return nil, fmt.Errorf("challenge MAC key is %d bytes; derive at least %d bytes from the master key", len(key), MinKeySize)
	}
	c := &Challenger{
		key:  append([]byte(nil), key...),
		ttl:  DefaultChallengeTTL,
		now:  time.Now,
		rand: func(b []byte) error { _, err := rand.Read(b); return err },
	}
	for _, o := range opts {
		o(c)
	}
	if c.ttl <= 0 {
		return nil, fmt.Errorf("challenge TTL %v is not positive", c.ttl)
	}
	return c, nil
}

// Issue makes a fresh challenge for (vm, volume, ekPub, akPub). It returns
// the nonce the VM must quote with, and the token the VM sends back with
// its attestation.
func (c *Challenger) Issue(vm, volume string, ekPub, akPub crypto.PublicKey) (nonce []byte, token string, err error) {
	if err := checkName("vm", vm); err != nil {
		return nil, "", err
	}
	if err := checkName("volume", volume); err != nil {
		return nil, "", err
	}
	ek, err := KeyFingerprint(ekPub)
	if err != nil {
		return nil, "", fmt.Errorf("issue challenge: EK: %w", err)
	}
	ak, err := KeyFingerprint(akPub)
	if err != nil {
		return nil, "", fmt.Errorf("issue challenge: AK: %w", err)
	}
	nonce = make([]byte, NonceSize)
	if err := c.rand(nonce); err != nil {
		return nil, "", fmt.Errorf("issue challenge: read random nonce: %w", err)
	}
	now := c.now()
	cl := Claims{VM: vm, Volume: volume, EK: ek, AK: ak, Nonce: nonce,
		IssuedAt: now, Expiry: now.Add(c.ttl)}
	payload := marshalClaims(cl)
	enc := base64.RawURLEncoding
	token = tokenVersion + "." + enc.EncodeToString(payload) + "." + enc.EncodeToString(c.mac(payload))
	return nonce, token, nil
}

// Check verifies token and returns its claims. It checks, in order:
//   - the token is a v1 token of sane size and encoding (ErrChallengeMalformed);
//   - its HMAC-SHA256 under the Challenger's key, in constant time
//     (ErrChallengeMAC); only then is the payload parsed;
//   - it is bound to vm, volume, ekPub and akPub (ErrChallengeBinding);
//   - now is before its expiry (ErrChallengeExpired).
//
// Check does not record the use; Redeem does.
func (c *Challenger) Check(token, vm, volume string, ekPub, akPub crypto.PublicKey, now time.Time) (Claims, error) {
	payload, err := c.verifyToken(token)
	if err != nil {
		return Claims{}, err
	}
	cl, err := unmarshalClaims(payload)
	if err != nil {
		// A MAC'd payload we cannot parse was made by a newer or buggy issuer.
		return Claims{}, fmt.Errorf("%w: %v", ErrChallengeMalformed, err)
	}
	ek, err := KeyFingerprint(ekPub)
	if err != nil {
		return Claims{}, fmt.Errorf("check challenge: EK: %w", err)
	}
	ak, err := KeyFingerprint(akPub)
	if err != nil {
		return Claims{}, fmt.Errorf("check challenge: AK: %w", err)
	}
	var wrong []string
	if cl.VM != vm {
		wrong = append(wrong, "vm")
	}
	if cl.Volume != volume {
		wrong = append(wrong, "volume")
	}
	if cl.EK != ek {
		wrong = append(wrong, "EK")
	}
	if cl.AK != ak {
		wrong = append(wrong, "AK")
	}
	if len(wrong) > 0 {
		return Claims{}, fmt.Errorf("%w: %s differ(s); request a new challenge for this vm and volume", ErrChallengeBinding, strings.Join(wrong, ", "))
	}
	if !now.Before(cl.Expiry) {
		return Claims{}, fmt.Errorf("%w at %s (now %s); request a new challenge", ErrChallengeExpired,
			cl.Expiry.UTC().Format(time.RFC3339), now.UTC().Format(time.RFC3339))
	}
	return cl, nil
}

// Redeem is Check followed by recording the challenge in the ReplayCache:
// a token is accepted once; a second Redeem before expiry fails with
// ErrChallengeReplayed. Redeem a challenge before verifying the evidence it
// came with, so that a failed attempt also uses it up.
func (c *Challenger) Redeem(token, vm, volume string, ekPub, akPub crypto.PublicKey, now time.Time) (Claims, error) {
	if c.cache == nil {
		return Claims{}, errors.New("redeem challenge: no replay cache configured (use WithReplayCache)")
	}
	cl, err := c.Check(token, vm, volume, ekPub, akPub, now)
	if err != nil {
		return Claims{}, err
	}
	fresh, err := c.cache.Use(cl.ID(), cl.Expiry)
	if err != nil {
		return Claims{}, fmt.Errorf("redeem challenge: record use: %w", err)
	}
	if !fresh {
		return Claims{}, fmt.Errorf("%w; request a new challenge for every unlock", ErrChallengeReplayed)
	}
	return cl, nil
}

// verifyToken splits token, checks its version and MAC, and returns the
// authenticated payload.
func (c *Challenger) verifyToken(token string) ([]byte, error) {
	if len(token) > maxTokenLen {
		return nil, fmt.Errorf("%w: %d bytes long", ErrChallengeMalformed, len(token))
	}
	parts := strings.Split(token, ".")
	if len(parts) != 3 {
		return nil, fmt.Errorf("%w: want 3 dot-separated parts, got %d", ErrChallengeMalformed, len(parts))
	}
	if parts[0] != tokenVersion {
		return nil, fmt.Errorf("%w: version %q is not %q", ErrChallengeMalformed, truncate(parts[0], 16), tokenVersion)
	}
	enc := base64.RawURLEncoding.Strict()
	payload, err := enc.DecodeString(parts[1])
	if err != nil {
		return nil, fmt.Errorf("%w: payload: %v", ErrChallengeMalformed, err)
	}
	mac, err := enc.DecodeString(parts[2])
	if err != nil {
		return nil, fmt.Errorf("%w: mac: %v", ErrChallengeMalformed, err)
	}
	if len(mac) != macSize {
		return nil, fmt.Errorf("%w: mac is %d bytes, want %d", ErrChallengeMalformed, len(mac), macSize)
	}
	if !hmac.Equal(mac, c.mac(payload)) {
		return nil, fmt.Errorf("%w: not issued by this key service, or altered", ErrChallengeMAC)
	}
	return payload, nil
}

func (c *Challenger) mac(payload []byte) []byte {
	m := hmac.New(sha256.New, c.key)
	m.Write(macLabel)
	m.Write(payload)
	return m.Sum(nil)
}

// marshalClaims encodes the v1 payload: big-endian issued and expiry (Unix
// nanoseconds), nonce, EK and AK fingerprints, then the vm and volume names,
// each after a 2-byte length.
func marshalClaims(cl Claims) []byte {
	b := make([]byte, 0, fixedPayload+len(cl.VM)+len(cl.Volume))
	b = binary.BigEndian.AppendUint64(b, uint64(cl.IssuedAt.UnixNano()))
	b = binary.BigEndian.AppendUint64(b, uint64(cl.Expiry.UnixNano()))
	b = append(b, cl.Nonce...)
	b = append(b, cl.EK[:]...)
	b = append(b, cl.AK[:]...)
	b = binary.BigEndian.AppendUint16(b, uint16(len(cl.VM)))
	b = append(b, cl.VM...)
	b = binary.BigEndian.AppendUint16(b, uint16(len(cl.Volume)))
	b = append(b, cl.Volume...)
	return b
}

func unmarshalClaims(b []byte) (Claims, error) {
	var cl Claims
	if len(b) < fixedPayload {
		return cl, fmt.Errorf("payload is %d bytes, want at least %d", len(b), fixedPayload)
	}
	cl.IssuedAt = time.Unix(0, int64(binary.BigEndian.Uint64(b)))
	cl.Expiry = time.Unix(0, int64(binary.BigEndian.Uint64(b[8:])))
	b = b[16:]
	cl.Nonce = append([]byte(nil), b[:NonceSize]...)
	b = b[NonceSize:]
	copy(cl.EK[:], b)
	b = b[sha256.Size:]
	copy(cl.AK[:], b)
	b = b[sha256.Size:]
	var err error
	if cl.VM, b, err = readName(b); err != nil {
		return cl, fmt.Errorf("vm: %v", err)
	}
	if cl.Volume, b, err = readName(b); err != nil {
		return cl, fmt.Errorf("volume: %v", err)
	}
	if len(b) != 0 {
		return cl, fmt.Errorf("%d trailing bytes", len(b))
	}
	return cl, nil
}

func readName(b []byte) (string, []byte, error) {
	if len(b) < 2 {
		return "", nil, errors.New("length missing")
	}
	n := int(binary.BigEndian.Uint16(b))
	b = b[2:]
	if n > len(b) {
		return "", nil, fmt.Errorf("length %d exceeds the %d bytes left", n, len(b))
	}
	return string(b[:n]), b[n:], nil
}

func checkName(what, s string) error {
	if s == "" {
		return fmt.Errorf("issue challenge: %s name is empty", what)
	}
	if len(s) > maxNameLen {
		return fmt.Errorf("issue challenge: %s name is %d bytes, longer than %d", what, len(s), maxNameLen)
	}
	return nil
}

func truncate(s string, n int) string {
	if len(s) > n {
		return s[:n] + "…"
	}
	return s
}
