package store_test

import (
	"bytes"
	"context"
	"errors"
	"reflect"
	"testing"
	"time"

	"github.com/keygate/keygate/keysvc/store"
)

// TestGetVMAndVolume checks the unlock path's joined read against the two
// reads it replaces, and GetVMAndVolumeUsing against it and ChallengeUsed.
func TestGetVMAndVolume(t *testing.T) { each(t, testGetVMAndVolume) }

func testGetVMAndVolume(t *testing.T, s store.Backend) {
	ctx := context.Background()
	for _, vm := range []store.VM{{Name: "web-1", EKPubPEM: "ek1", AKPubPEM: "ak1", Policy: []byte(`{"pcrs":{}}`)}, {Name: "web-2", EKPubPEM: "ek2", Revoked: true}} {
		if _, err := s.CreateVM(ctx, vm); err != nil {
			t.Fatal(err)
		}
	}
	for _, v := range []store.Volume{{ID: "a", VM: "web-1", SealedUK: []byte("sealed-a")}, {ID: "b", VM: "web-2", SealedUK: []byte("sealed-b")}, {ID: "gone", VM: "web-1", SealedUK: []byte("x")},
		{ID: "rot", VM: "web-1", SealedUK: []byte("sealed-rot")}} {
		if _, err := s.CreateVolume(ctx, v); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := s.(store.Rotations).StartRotation(ctx, "rot", startWith([]byte("pending")), nextRecord("rotate")); err != nil {
		t.Fatal(err)
	}
	if _, err := s.UpdateVolume(ctx, "gone", func(v *store.Volume) error { v.SealedUK = nil; return nil }); err != nil {
		t.Fatal(err)
	}
	if err := s.UseChallenge(ctx, "used-1", time.Now().Add(time.Hour)); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name, vm, vol string
		wantErr       error
		wantVol       bool
	}{
		{"both", "web-1", "a", nil, true},
		{"another vm's volume", "web-1", "b", nil, true},
		{"erased volume", "web-1", "gone", nil, true},
		{"no volume", "web-1", "nope", nil, false},
		{"revoked vm", "web-2", "b", nil, true},
		{"rotation pending", "web-1", "rot", nil, true},
		{"no vm", "nobody", "a", store.ErrNotFound, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			vm, vol, err := s.GetVMAndVolume(ctx, tc.vm, tc.vol)
			if !errors.Is(err, tc.wantErr) || (err != nil) != (tc.wantErr != nil) {
				t.Fatalf("error %v, want %v", err, tc.wantErr)
			}
			for _, ch := range []struct {
				id   string
				used bool
			}{{"used-1", true}, {"fresh", false}} {
				uvm, uvol, used, uerr := s.GetVMAndVolumeUsing(ctx, tc.vm, tc.vol, ch.id)
				if !errors.Is(uerr, tc.wantErr) || (uerr != nil) != (tc.wantErr != nil) {
					t.Fatalf("GetVMAndVolumeUsing(%q): error %v, want %v", ch.id, uerr, tc.wantErr)
				}
				if uerr != nil {
					continue
				}
				if used != ch.used {
					t.Errorf("GetVMAndVolumeUsing(%q): used %v, want %v", ch.id, used, ch.used)
				}
				if !reflect.DeepEqual(uvm, vm) || !reflect.DeepEqual(uvol, vol) {
					t.Errorf("GetVMAndVolumeUsing(%q) read %+v %+v, GetVMAndVolume %+v %+v", ch.id, uvm, uvol, vm, vol)
				}
			}
			if err != nil {
				return
			}
			wantVM, err := s.GetVM(ctx, tc.vm)
			if err != nil {
				t.Fatal(err)
			}
			if vm.Name != wantVM.Name || vm.EKPubPEM != wantVM.EKPubPEM || vm.AKPubPEM != wantVM.AKPubPEM || vm.Revoked != wantVM.Revoked ||
				!bytes.Equal(vm.Policy, wantVM.Policy) || !vm.Created.Equal(wantVM.Created) || !vm.Updated.Equal(wantVM.Updated) {
				t.Fatalf("vm %+v, GetVM says %+v", vm, wantVM)
			}
			if (vol != nil) != tc.wantVol {
				t.Fatalf("volume %+v, want one: %v", vol, tc.wantVol)
			}
			if vol == nil {
				return
			}
			want, err := s.GetVolume(ctx, tc.vol)
			if err != nil {
				t.Fatal(err)
			}
			if vol.ID != want.ID || vol.VM != want.VM || !bytes.Equal(vol.SealedUK, want.SealedUK) || vol.Erased() != want.Erased() ||
				!vol.ErasedAt.Equal(want.ErasedAt) || !vol.Created.Equal(want.Created) ||
				vol.Rotation != want.Rotation || vol.RotationPending != want.RotationPending {
				t.Fatalf("volume %+v, GetVolume says %+v", vol, want)
			}
			// The unlock reads whether a rotation row exists, in the same
			// query, to skip reading it when none does.
			if _, err := s.(store.Rotations).GetRotation(ctx, tc.vol); vol.RotationRow != (err == nil) {
				t.Fatalf("volume %q: RotationRow %v, but GetRotation says %v", tc.vol, vol.RotationRow, err)
			}
			if vol.RotationRow != (tc.vol == "rot") {
				t.Fatalf("volume %q: RotationRow %v", tc.vol, vol.RotationRow)
			}
		})
	}
}
