package keysvc

import (
	"bytes"
	"encoding/hex"
	"errors"
	"strings"
	"testing"

	"github.com/awnumar/memguard"

	"github.com/keygate/keygate/attest"
	"github.com/keygate/keygate/keysvc/store"
)

func testRowKey() rowKey {
	return newRowKey(memguard.NewBufferFromBytes(bytes.Repeat([]byte{7}, 32)))
}

// TestRowMACCoversEveryReleaseField: changing any field that decides a
// release breaks the row's MAC; the times, which decide nothing, do not.
func TestRowMACCoversEveryReleaseField(t *testing.T) {
	k := testRowKey()
	defer k.key.Destroy()
	base := store.VM{Name: "a", EKPubPEM: "ek", AKPubPEM: "ak", Policy: []byte(`{"pcrs":{}}`)}
	base.MAC = k.vmMAC(base)
	for _, tc := range []struct {
		name   string
		change func(*store.VM)
		ok     bool
	}{
		{"unchanged", func(*store.VM) {}, true},
		{"updated-time", func(v *store.VM) { v.Updated = v.Updated.Add(1) }, true},
		{"name", func(v *store.VM) { v.Name = "b" }, false},
		{"ek", func(v *store.VM) { v.EKPubPEM = "ek2" }, false},
		{"ak", func(v *store.VM) { v.AKPubPEM = "" }, false},
		{"ak-into-ek", func(v *store.VM) { v.EKPubPEM, v.AKPubPEM = "eka", "k" }, false},
		{"policy", func(v *store.VM) { v.Policy = []byte(`{}`) }, false},
		{"revoked", func(v *store.VM) { v.Revoked = true }, false},
		{"learn", func(v *store.VM) { v.LearnArmed = true }, false},
		{"provisioning", func(v *store.VM) { v.ProvisioningAllowed = true }, false},
		{"no-mac", func(v *store.VM) { v.MAC = nil }, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			v := base
			tc.change(&v)
			err := k.checkVM(v)
			if (err == nil) != tc.ok || (err != nil && !errors.Is(err, ErrTampered)) {
				t.Fatalf("checkVM: %v, want ok=%v", err, tc.ok)
			}
		})
	}
	vol := store.Volume{ID: "v", VM: "a", SealedUK: []byte{1}}
	vol.MAC = k.volumeMAC(vol)
	for _, tc := range []struct {
		name   string
		change func(*store.Volume)
	}{
		{"id", func(v *store.Volume) { v.ID = "w" }},
		{"owner", func(v *store.Volume) { v.VM = "b" }},
		{"erased", func(v *store.Volume) { v.SealedUK = nil }},
	} {
		t.Run("volume-"+tc.name, func(t *testing.T) {
			v := vol
			tc.change(&v)
			if err := k.checkVolume(v); !errors.Is(err, ErrTampered) || !strings.Contains(err.Error(), `volume "`) {
				t.Fatalf("checkVolume: %v, want a TamperError naming the volume", err)
			}
		})
	}
}

// BenchmarkRowChecks is what row authentication adds to one unlock: two
// reads of a VM and its volume, each checked (four MACs), and the EK
// fingerprint for the sealed UK's record ID.
func BenchmarkRowChecks(b *testing.B) {
	k := testRowKey()
	defer k.key.Destroy()
	ek, _ := parsePublicKeyPEM("ek", testEKPEM)
	vm := store.VM{Name: "web-1", EKPubPEM: testEKPEM, AKPubPEM: testEKPEM, Policy: bytes.Repeat([]byte("x"), 600)}
	vm.MAC = k.vmMAC(vm)
	vol := store.Volume{ID: "web-1-vol", VM: "web-1", SealedUK: make([]byte, 61)}
	vol.MAC = k.volumeMAC(vol)
	b.ReportAllocs()
	for b.Loop() {
		for range 2 {
			if k.checkVM(vm) != nil || k.checkVolume(vol) != nil {
				b.Fatal("check failed")
			}
		}
		fp, _ := attest.KeyFingerprint(ek)
		_ = ukRecordID(vol.ID, vm.Name, hex.EncodeToString(fp[:]))
	}
}

const testEKPEM = `-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEqHsHqLa4FIz6VVT9wZtjKI7Qp1Z6
GQ4Cfb5ehu/6jFvTexDv5ZDfU/zL2w6U5zDm3Pp1ZJtHZ+x3MxR3aTzvxQ==
-----END PUBLIC KEY-----
`
