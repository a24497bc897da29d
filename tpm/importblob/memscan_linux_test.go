package importblob_test

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"errors"
	"testing"

	tpmpb "github.com/google/go-tpm-tools/proto/tpm"
	"github.com/google/go-tpm-tools/server"

	"github.com/keygate/keygate/internal/memscan"
	"github.com/keygate/keygate/internal/testutil"
	"github.com/keygate/keygate/keymem"
	"github.com/keygate/keygate/tpm/importblob"
)

// TestSecretOnlyInLockedMemory makes many blobs for one secret held in key
// memory and then searches every readable mapping of the process for the
// secret: apart from its own locked buffer, it must be nowhere (not in
// freed heap, not in a hash state, not on a stack).
func TestSecretOnlyInLockedMemory(t *testing.T) {
	for _, tc := range []struct {
		name  string
		make  func(ek *ecdsa.PublicKey, secret []byte, pcrs *tpmpb.PCRs) (*tpmpb.ImportBlob, error)
		leaks bool
	}{
		{"importblob.New", func(ek *ecdsa.PublicKey, s []byte, p *tpmpb.PCRs) (*tpmpb.ImportBlob, error) {
			return importblob.New(ek, s, p)
		}, false},
		// The control: go-tpm-tools' builder, which importblob replaces,
		// leaves copies behind. The scan finding them shows it can fail.
		{"server.CreateImportBlob", func(ek *ecdsa.PublicKey, s []byte, p *tpmpb.PCRs) (*tpmpb.ImportBlob, error) {
			return server.CreateImportBlob(ek, s, p)
		}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
			if err != nil {
				t.Fatal(err)
			}
			secret, err := keymem.Random(32) // a secret no other test uses
			if err != nil {
				t.Fatal(err)
			}
			defer secret.Destroy()
			pcrs := &tpmpb.PCRs{Hash: tpmpb.HashAlgo_SHA256, Pcrs: map[uint32][]byte{7: make([]byte, 32), 15: make([]byte, 32)}}
			for range 50 {
				if _, err := tc.make(&key.PublicKey, secret.Bytes(), pcrs); err != nil {
					t.Fatal(err)
				}
			}
			nd := memscan.NewNeedle("secret", secret.Bytes())
			res, err := memscan.Scan([]memscan.Needle{nd}, memscan.RangeOf(secret.Bytes()))
			if errors.Is(err, memscan.ErrUnavailable) {
				testutil.Skip(t, "procmem", err.Error())
			}
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("scanned %d MiB in %d mappings: %d copies outside the secret's buffer", res.Scanned>>20, res.Mappings, len(res.Hits))
			switch {
			case tc.leaks && len(res.Hits) == 0:
				t.Fatal("the scan found no copy left by go-tpm-tools' builder: it cannot see the heap, so it proves nothing")
			case !tc.leaks:
				for _, h := range res.Hits {
					t.Errorf("secret found outside locked memory: %v", h)
				}
			}
		})
	}
}
