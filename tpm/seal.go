package tpm

import (
	"errors"
	"fmt"

	"github.com/awnumar/memguard"
	"github.com/google/go-tpm-tools/client"
	tpmpb "github.com/google/go-tpm-tools/proto/tpm"
	"github.com/google/go-tpm/legacy/tpm2"
	"google.golang.org/protobuf/proto"
)

// ErrSealedElsewhere is returned by [TPM.Unseal] when the TPM refuses to load
// the sealed object: it was sealed by another TPM, or this TPM's storage
// hierarchy was cleared (TPM2_Clear) since, which replaces the seed the
// storage root key is derived from.
var ErrSealedElsewhere = errors.New("sealed blob was not made by this TPM (another TPM, or this one was cleared since)")

// Seal seals secret (at most 128 bytes) to this TPM's storage root key (the
// ECC SRK of the owner hierarchy) and returns the result as a serialized
// go-tpm-tools SealedBytes. It is bound to no PCRs: only this TPM, until its
// owner hierarchy is cleared, can Unseal it. Binding to the host's boot state
// would make every firmware update lock the key out, which is the wrong
// trade for a key service's master key.
//
// The SRK is loaded for the call and flushed before Seal returns.
func (t *TPM) Seal(secret []byte) ([]byte, error) {
	if len(secret) == 0 {
		return nil, errors.New("seal: empty secret")
	}
	if err := t.lock(); err != nil {
		return nil, err
	}
	defer t.mu.Unlock()
	srk, err := client.StorageRootKeyECC(t.rw)
	if err != nil {
		return nil, fmt.Errorf("seal: load storage root key: %w", err)
	}
	defer srk.Close()
	sb, err := srk.Seal(secret, client.SealOpts{})
	if err != nil {
		return nil, fmt.Errorf("seal: %w", err)
	}
	out, err := proto.Marshal(sb)
	if err != nil {
		return nil, fmt.Errorf("seal: marshal: %v", err)
	}
	return out, nil
}

// Unseal recovers a secret sealed by [TPM.Seal] on this TPM into a memguard
// LockedBuffer, which the caller must Destroy; the heap copy go-tpm-tools
// returned is zeroed. An error wraps [ErrSealedElsewhere] when the TPM
// refuses the object (another TPM, or a cleared one). The SRK and the sealed
// object are flushed before Unseal returns.
func (t *TPM) Unseal(blob []byte) (*memguard.LockedBuffer, error) {
	var sb tpmpb.SealedBytes
	if err := proto.Unmarshal(blob, &sb); err != nil || len(sb.GetPriv()) == 0 || len(sb.GetPub()) == 0 {
		return nil, errors.New("unseal: not a sealed blob made by Seal (the file is damaged or of another kind)")
	}
	if err := t.lock(); err != nil {
		return nil, err
	}
	defer t.mu.Unlock()
	srk, err := client.StorageRootKeyECC(t.rw)
	if err != nil {
		return nil, fmt.Errorf("unseal: load storage root key: %w", err)
	}
	defer srk.Close()
	secret, err := srk.Unseal(&sb, client.UnsealOpts{})
	if err != nil {
		// A TPM answer (an integrity or size failure of the load) means the
		// blob belongs to another storage seed; anything else, say a broken
		// socket, is reported as it is.
		var pe tpm2.ParameterError
		var te tpm2.Error
		if errors.As(err, &pe) || errors.As(err, &te) {
			return nil, fmt.Errorf("unseal on TPM %s: %w (%v)", t.spec, ErrSealedElsewhere, err)
		}
		return nil, fmt.Errorf("unseal on TPM %s: %w", t.spec, err)
	}
	return memguard.NewBufferFromBytes(secret), nil // wipes secret
}
