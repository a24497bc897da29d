//go:build cgo

package hsm_test

import (
	"bytes"
	"path/filepath"
	"testing"

	"github.com/keygate/keygate/internal/testutil"
	"github.com/keygate/keygate/keysvc/masterkey"
	"github.com/keygate/keygate/keysvc/masterkey/hsm"
)

// BenchmarkOpen compares opening a sealed 32-byte UK in SoftHSM2 with a
// file key in the same run (an unlock opens one; a rotation opens and
// seals one per volume). Report the ratio, not the times.
func BenchmarkOpen(b *testing.B) {
	module := testutil.SoftHSM(b, "kg", pin)
	tok, err := hsmOpen(module)
	if err != nil {
		b.Fatal(err)
	}
	defer tok.Close()
	hk, _, err := tok.LoadOrCreate(tok.Label())
	if err != nil {
		b.Fatal(err)
	}
	fk, _, err := masterkey.LoadOrCreate(filepath.Join(b.TempDir(), "master.key"))
	if err != nil {
		b.Fatal(err)
	}
	defer fk.Destroy()
	uk := bytes.Repeat([]byte{1}, 32)
	for _, k := range []struct {
		name string
		m    masterkey.Master
	}{{"file", fk}, {"softhsm2", hk}} {
		sealed, err := k.m.Seal("vol", uk)
		if err != nil {
			b.Fatal(err)
		}
		b.Run(k.name+"/open", func(b *testing.B) {
			for b.Loop() {
				buf, err := k.m.Open("vol", sealed)
				if err != nil {
					b.Fatal(err)
				}
				buf.Destroy()
			}
		})
		b.Run(k.name+"/seal", func(b *testing.B) {
			for b.Loop() {
				if _, err := k.m.Seal("vol", uk); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

func hsmOpen(module string) (*hsm.Token, error) {
	u, err := hsm.ParseURI("pkcs11:token=kg;object=master")
	if err != nil {
		return nil, err
	}
	return hsm.Open(hsm.Config{Module: module, URI: u, PIN: []byte(pin)})
}
