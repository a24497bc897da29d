//go:build !cgo

package hsm

import (
	"errors"
	"fmt"

	"github.com/awnumar/memguard"

	"github.com/keygate/keygate/keysvc/masterkey"
)

// ErrNoCgo: PKCS#11 modules are C libraries, loaded through cgo. A keysvc
// built with CGO_ENABLED=0 (as static VM-side binaries that embed the demo
// service are) says so instead of failing to build.
var ErrNoCgo = errors.New("this binary was built without cgo, which loading a PKCS#11 module needs: build keysvc with CGO_ENABLED=1 (make build does)")

// Token is a logged-in PKCS#11 token; without cgo there is none.
type Token struct{}

// Open reports ErrNoCgo.
func Open(Config) (*Token, error) { return nil, fmt.Errorf("pkcs11: %w", ErrNoCgo) }

func (t *Token) Close()                                  {}
func (t *Token) Label() string                           { return "" }
func (t *Token) LoadOrCreate(string) (*Key, bool, error) { return nil, false, ErrNoCgo }
func (t *Token) Find(string) (*Key, error)               { return nil, ErrNoCgo }
func (t *Token) CreateNext() (*Key, error)               { return nil, ErrNoCgo }
func (t *Token) FindNext() (*Key, error)                 { return nil, ErrNoCgo }
func (t *Token) Install() error                          { return ErrNoCgo }

// Key is an AES-256 key object in a token; without cgo there is none.
type Key struct{}

var _ masterkey.Master = (*Key)(nil)

func (k *Key) Destroy()                                            {}
func (k *Key) Seal(string, []byte) ([]byte, error)                 { return nil, ErrNoCgo }
func (k *Key) Open(string, []byte) (*memguard.LockedBuffer, error) { return nil, ErrNoCgo }
func (k *Key) Derive(string) (*memguard.LockedBuffer, error)       { return nil, ErrNoCgo }
