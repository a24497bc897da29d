package importblob_test

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"testing"

	tpmpb "github.com/google/go-tpm-tools/proto/tpm"
	"github.com/google/go-tpm-tools/server"

	"github.com/keygate/keygate/tpm/importblob"
)

// BenchmarkNew is keysvc's cost per release, next to go-tpm-tools' builder
// (the reference it replaced) in the same run.
func BenchmarkNew(b *testing.B) {
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	secret := make([]byte, 32)
	pcrs := &tpmpb.PCRs{Hash: tpmpb.HashAlgo_SHA256, Pcrs: map[uint32][]byte{0: make([]byte, 32), 7: make([]byte, 32), 15: make([]byte, 32)}}
	b.Run("importblob", func(b *testing.B) {
		for b.Loop() {
			if _, err := importblob.New(&key.PublicKey, secret, pcrs); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("go-tpm-tools", func(b *testing.B) {
		for b.Loop() {
			if _, err := server.CreateImportBlob(&key.PublicKey, secret, pcrs); err != nil {
				b.Fatal(err)
			}
		}
	})
}
