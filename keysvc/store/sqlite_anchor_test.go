package store_test

import (
	"bytes"
	"context"
	"errors"
	"testing"
	"time"

	"github.com/keygate/keygate/keysvc/store"
)

// nextRecord is an AuditNext that appends a plain record after last (the
// store keeps the bytes; package audit owns the hashing).
func nextRecord(action string) store.AuditNext {
	return func(last *store.AuditRecord, _ *store.AuditHead) (store.AuditRecord, store.AuditHead, error) {
		seq := uint64(1)
		if last != nil {
			seq = last.Seq + 1
		}
		r := store.AuditRecord{Seq: seq, Time: time.Now(), Actor: "test", Action: action, Details: []byte("{}"),
			PrevHash: []byte{0}, Hash: []byte{byte(seq)}, MAC: []byte{1}}
		return r, store.AuditHead{Seq: seq, Hash: r.Hash, MAC: []byte{2}}, nil
	}
}

// TestAdopt: Adopt stores every row's MAC, the re-sealed UKs, the record
// and the anchor naming it together, or nothing at all; a second Adopt is
// ErrExists; and a callback cannot change what it must not.
func TestAdopt(t *testing.T) { forEachBackend(t, testAdopt) }

func testAdopt(t *testing.T, b backend) {
	ctx := context.Background()
	mac := []byte("mac")
	anchor := func(r store.AuditRecord) store.Anchor {
		return store.Anchor{Created: time.Unix(1, 0).UTC(), GenesisSeq: r.Seq, GenesisHash: r.Hash, MAC: []byte("anchor")}
	}
	setMAC := func(v *store.VM) error { v.MAC = mac; return nil }
	reseal := func(v *store.Volume) error { v.MAC, v.SealedUK = mac, []byte("resealed"); return nil }
	boom := errors.New("boom")
	for _, tc := range []struct {
		name    string
		vm      func(*store.VM) error
		vol     func(*store.Volume) error
		wantErr error
	}{
		{"all", setMAC, reseal, nil},
		{"volume-callback-fails", setMAC, func(*store.Volume) error { return boom }, boom},
		{"vm-callback-changes-ek", func(v *store.VM) error { v.EKPubPEM = "other"; return nil }, reseal, store.ErrImmutable},
		{"volume-callback-changes-owner", setMAC, func(v *store.Volume) error { v.VM = "b"; return nil }, store.ErrImmutable},
	} {
		t.Run(tc.name, func(t *testing.T) {
			st := forEachCase(t, b).open(t)
			if _, err := st.CreateVM(ctx, store.VM{Name: "a", EKPubPEM: "ek"}); err != nil {
				t.Fatal(err)
			}
			if _, err := st.CreateVolume(ctx, store.Volume{ID: "v", VM: "a", SealedUK: []byte("sealed")}); err != nil {
				t.Fatal(err)
			}
			err := st.Adopt(ctx, tc.vm, tc.vol, nextRecord("genesis"), anchor)
			if !errors.Is(err, tc.wantErr) {
				t.Fatalf("Adopt: %v, want %v", err, tc.wantErr)
			}
			a, aerr := st.Anchor(ctx)
			vm, _ := st.GetVM(ctx, "a")
			vol, _ := st.GetVolume(ctx, "v")
			var n int
			st.ScanAudit(ctx, 1, func(store.AuditRecord) error { n++; return nil })
			if aerr != nil {
				t.Fatal(aerr)
			}
			if tc.wantErr != nil {
				if a != nil || vm.MAC != nil || vol.MAC != nil || !bytes.Equal(vol.SealedUK, []byte("sealed")) || n != 0 {
					t.Fatalf("a failed Adopt left anchor %v, vm MAC %q, volume %q/%q, %d records", a, vm.MAC, vol.MAC, vol.SealedUK, n)
				}
				return
			}
			if a == nil || a.GenesisSeq != 1 || !bytes.Equal(a.GenesisHash, []byte{1}) || !bytes.Equal(vm.MAC, mac) ||
				!bytes.Equal(vol.MAC, mac) || !bytes.Equal(vol.SealedUK, []byte("resealed")) || n != 1 {
				t.Fatalf("after Adopt: anchor %+v, vm MAC %q, volume %q/%q, %d records", a, vm.MAC, vol.MAC, vol.SealedUK, n)
			}
			if err := st.Adopt(ctx, setMAC, reseal, nextRecord("genesis"), anchor); !errors.Is(err, store.ErrExists) {
				t.Fatalf("second Adopt: %v, want ErrExists", err)
			}
		})
	}
}

// TestRowMACKept: the store keeps a row's MAC as given through every write
// and returns it from every read, the joined one included.
func TestRowMACKept(t *testing.T) { each(t, testRowMACKept) }

func testRowMACKept(t *testing.T, st store.Backend) {
	ctx := context.Background()
	if _, err := st.CreateVM(ctx, store.VM{Name: "a", EKPubPEM: "ek", MAC: []byte("m1")}); err != nil {
		t.Fatal(err)
	}
	if _, err := st.CreateVolume(ctx, store.Volume{ID: "v", VM: "a", SealedUK: []byte("s"), MAC: []byte("v1")}); err != nil {
		t.Fatal(err)
	}
	if _, err := st.UpdateVM(ctx, "a", func(v *store.VM) error { v.Revoked, v.MAC = true, []byte("m2"); return nil }); err != nil {
		t.Fatal(err)
	}
	if _, err := st.UpdateVolume(ctx, "v", func(v *store.Volume) error { v.SealedUK, v.MAC = nil, []byte("v2"); return nil }); err != nil {
		t.Fatal(err)
	}
	vm, vol, err := st.GetVMAndVolume(ctx, "a", "v")
	if err != nil || vol == nil {
		t.Fatalf("GetVMAndVolume: %v %v", vol, err)
	}
	got, _ := st.GetVM(ctx, "a")
	gotVol, _ := st.GetVolume(ctx, "v")
	for _, c := range []struct{ name, got, want string }{
		{"vm joined", string(vm.MAC), "m2"}, {"volume joined", string(vol.MAC), "v2"},
		{"vm", string(got.MAC), "m2"}, {"volume", string(gotVol.MAC), "v2"},
	} {
		if c.got != c.want {
			t.Errorf("%s MAC %q, want %q", c.name, c.got, c.want)
		}
	}
}
