package keysvc

import (
	"crypto"
	"encoding/json"
	"sync"

	"github.com/keygate/keygate/attest"
)

// parseCache memoises a pure parse of stored text: an enrolled PEM key or a
// stored policy, which every unlock otherwise parses again (twice for the
// keys, with the re-check after the audit record).
//
// It is keyed by the text itself, never by a VM's name, so it cannot serve
// a stale answer: every request still reads the VM's record from the store,
// and a revoke, a re-enrolled key or a new policy is new text, parsed
// afresh. Only successful parses are kept. Cached values are shared by
// concurrent requests and must not be modified.
//
// It is bounded in entries and in the bytes of its keys; past either bound
// it drops an arbitrary entry (Go's map order) for each one it adds.
type parseCache[V any] struct {
	mu         sync.RWMutex
	m          map[string]V
	size       int // sum of len(key)
	maxEntries int
	maxBytes   int
	maxKey     int // longer texts are parsed every time
}

func newParseCache[V any](maxEntries, maxBytes, maxKey int) *parseCache[V] {
	return &parseCache[V]{m: make(map[string]V), maxEntries: maxEntries, maxBytes: maxBytes, maxKey: maxKey}
}

func (c *parseCache[V]) get(text []byte, parse func([]byte) (V, error)) (V, error) {
	c.mu.RLock()
	v, ok := c.m[string(text)]
	c.mu.RUnlock()
	if ok {
		return v, nil
	}
	v, err := parse(text)
	if err != nil || len(text) > c.maxKey {
		return v, err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if _, ok := c.m[string(text)]; ok {
		return v, nil
	}
	for k := range c.m {
		if len(c.m) < c.maxEntries && c.size+len(text) <= c.maxBytes {
			break
		}
		c.size -= len(k)
		delete(c.m, k)
	}
	c.m[string(text)] = v
	c.size += len(text)
	return v, nil
}

// Bounds of the caches: far more VMs than one service holds, in a few MiB.
var (
	keyCache    = newParseCache[crypto.PublicKey](16384, 16<<20, 4<<10)
	policyCache = newParseCache[*attest.Policy](16384, 32<<20, 64<<10)
)

// enrolledKey is parsePublicKeyPEM for a key stored at enrollment, through
// keyCache.
func enrolledKey(what, pemText string) (crypto.PublicKey, error) {
	return keyCache.get([]byte(pemText), func(b []byte) (crypto.PublicKey, error) {
		return parsePublicKeyPEM(what, string(b))
	})
}

// storedPolicy parses a VM's stored policy ("{}" if empty), through
// policyCache. The returned policy is shared: read it, never change it.
func storedPolicy(raw json.RawMessage) (*attest.Policy, error) {
	if len(raw) == 0 {
		raw = json.RawMessage("{}")
	}
	return policyCache.get(raw, attest.ParsePolicy)
}
