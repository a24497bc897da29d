package keysvc

import (
	"errors"
	"sync"

	"github.com/keygate/keygate/keymem"
	"github.com/keygate/keygate/keysvc/masterkey"
)

// Sizes of the pool of buffers for unwrap keys. A slot holds a key of up to
// ukSlotSize bytes, the most a TPM imports as sealed data (MAX_SYM_DATA);
// longer keys take the Open path. ukPoolSize bounds the locked memory
// (one page per buffer) and covers far more unlocks in flight between
// decryption and the import blob than two cores run at once.
const (
	ukSlotSize = 128
	ukPoolSize = 64
)

var (
	ukPoolOnce sync.Once
	ukPoolV    *keymem.Pool
)

// ukPool is the process's pool for unwrap keys, made on first use so that
// importing the package locks no memory. It is shared by every Server in
// the process: buffers hold nothing between uses.
func ukPool() *keymem.Pool {
	ukPoolOnce.Do(func() { ukPoolV = keymem.NewPool(ukPoolSize, ukSlotSize) })
	return ukPoolV
}

// openerTo is implemented by a MasterKey that can decrypt into a caller's
// locked buffer (*masterkey.Key does).
type openerTo interface {
	OpenTo(dst []byte, recordID string, sealed []byte) (int, error)
}

// openUK decrypts a volume's sealed unwrap key into locked memory and
// returns it with the function that wipes it and gives the memory back.
// With a MasterKey that has OpenTo and a key that fits a slot, the memory
// comes from ukPool; otherwise it is Open's own buffer.
//
// During a master-key rotation a row not yet re-sealed opens under the
// previous key (keyring.go).
func (s *Server) openUK(id string, sealed []byte) (uk []byte, done func(), err error) {
	ks := s.rows.load()
	uk, done, err = openUKWith(ks.cur, id, sealed)
	if err != nil && ks.prev != nil && errors.Is(err, masterkey.ErrOpen) {
		uk, done, err = openUKWith(ks.prev, id, sealed)
	}
	return uk, done, err
}

func openUKWith(mk MasterKey, id string, sealed []byte) (uk []byte, done func(), err error) {
	if o, ok := mk.(openerTo); ok && len(sealed) <= ukSlotSize+masterkey.SealOverhead {
		p := ukPool()
		buf := p.Get()
		n, err := o.OpenTo(buf.Bytes(), id, sealed)
		if err != nil {
			p.Put(buf)
			return nil, nil, err
		}
		return buf.Bytes()[:n], func() { p.Put(buf) }, nil
	}
	buf, err := mk.Open(id, sealed)
	if err != nil {
		return nil, nil, err
	}
	return buf.Bytes(), buf.Destroy, nil
}
