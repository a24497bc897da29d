package store_test

import (
	"bytes"
	"context"
	"errors"
	"testing"

	"github.com/keygate/keygate/keysvc/store"
)

// auditCount is how many audit records the store holds.
func auditCount(t *testing.T, s store.Backend) int {
	t.Helper()
	n := 0
	if _, err := s.ScanAudit(context.Background(), 0, func(store.AuditRecord) error { n++; return nil }); err != nil {
		t.Fatal(err)
	}
	return n
}

// rotationFixture is a store on b's database with VM vm1 and volumes v1
// (with key "old") and gone (erased).
func rotationFixture(t *testing.T, b backend) store.Backend {
	t.Helper()
	ctx := context.Background()
	s := b.open(t)
	if _, err := s.CreateVM(ctx, store.VM{Name: "vm1", EKPubPEM: "ek"}); err != nil {
		t.Fatal(err)
	}
	for _, id := range []string{"v1", "gone"} {
		if _, err := s.CreateVolume(ctx, store.Volume{ID: id, VM: "vm1", SealedUK: []byte("old")}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := s.UpdateVolume(ctx, "gone", func(v *store.Volume) error { v.SealedUK = nil; return nil }); err != nil {
		t.Fatal(err)
	}
	return s
}

var errNext = errors.New("next failed")

// startWith is a RotationStart that stores sealed as the pending key, in
// the volume's next generation.
func startWith(sealed []byte) store.RotationStart {
	return func(v *store.Volume, r *store.Rotation) error {
		v.Rotation++
		v.RotationPending = true
		r.Generation, r.SealedUK, r.MAC = v.Rotation, sealed, []byte("rotation-mac")
		v.MAC = []byte("volume-mac")
		return nil
	}
}

func failNext(*store.AuditRecord, *store.AuditHead) (store.AuditRecord, store.AuditHead, error) {
	return store.AuditRecord{}, store.AuditHead{}, errNext
}

// TestStartRotation: a pending UK is stored with its audit record, or
// neither; one at a time; never for a missing or erased volume.
func TestStartRotation(t *testing.T) { forEachBackend(t, testStartRotation) }

func testStartRotation(t *testing.T, b backend) {
	tests := []struct {
		name    string
		volume  string
		sealed  []byte
		next    store.AuditNext
		twice   bool
		wantErr error
	}{
		{name: "starts", volume: "v1", sealed: []byte("new")},
		{name: "second-pending", volume: "v1", sealed: []byte("new"), twice: true, wantErr: store.ErrExists},
		{name: "missing-volume", volume: "nope", sealed: []byte("new"), wantErr: store.ErrNotFound},
		{name: "erased-volume", volume: "gone", sealed: []byte("new"), wantErr: store.ErrImmutable},
		{name: "audit-fails", volume: "v1", sealed: []byte("new"), next: failNext, wantErr: errNext},
		{name: "no-key", volume: "v1"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx := context.Background()
			s := rotationFixture(t, forEachCase(t, b))
			next := tt.next
			if next == nil {
				next = nextRecord("rotate")
			}
			if tt.twice {
				if _, err := s.StartRotation(ctx, tt.volume, startWith([]byte("first")), nextRecord("rotate")); err != nil {
					t.Fatal(err)
				}
			}
			before := auditCount(t, s)
			r, err := s.StartRotation(ctx, tt.volume, startWith(tt.sealed), next)
			if tt.sealed == nil {
				if err == nil {
					t.Fatal("a rotation without a key was stored")
				}
				return
			}
			if !errors.Is(err, tt.wantErr) || (tt.wantErr == nil) != (err == nil) {
				t.Fatalf("StartRotation: %v, want %v", err, tt.wantErr)
			}
			got, gerr := s.GetRotation(ctx, tt.volume)
			switch {
			case err == nil:
				if gerr != nil || !bytes.Equal(got.SealedUK, tt.sealed) || !got.Started.Equal(r.Started) {
					t.Fatalf("GetRotation = %+v, %v; want the stored rotation", got, gerr)
				}
				if n := auditCount(t, s); n != before+1 {
					t.Fatalf("audit records %d -> %d, want one more", before, n)
				}
				pend, err := s.PendingRotations(ctx)
				if err != nil || len(pend) != 1 || !pend[tt.volume].Equal(r.Started) {
					t.Fatalf("PendingRotations = %v, %v", pend, err)
				}
			case tt.twice:
				if !bytes.Equal(got.SealedUK, []byte("first")) {
					t.Fatalf("the pending key was replaced: %q", got.SealedUK)
				}
			default:
				if !errors.Is(gerr, store.ErrNotFound) {
					t.Fatalf("GetRotation after a failed start: %+v, %v; want ErrNotFound", got, gerr)
				}
				if n := auditCount(t, s); n != before {
					t.Fatalf("audit records %d -> %d after a failed start", before, n)
				}
			}
		})
	}
}

// TestFinishRotation: the pending UK becomes the volume's and the rotation
// row goes, with the audit record, atomically; a failure anywhere leaves
// the old key and the pending one as they were.
func TestFinishRotation(t *testing.T) { forEachBackend(t, testFinishRotation) }

func testFinishRotation(t *testing.T, b backend) {
	swap := func(v *store.Volume, r store.Rotation) error {
		v.SealedUK, v.MAC, v.RotationPending = append([]byte("resealed:"), r.SealedUK...), []byte("mac2"), false
		return nil
	}
	errFn := errors.New("fn refused")
	tests := []struct {
		name    string
		start   bool
		fn      func(*store.Volume, store.Rotation) error
		next    store.AuditNext
		key     string // the volume's key after a finish; "resealed:new" if ""
		wantErr error
	}{
		{name: "finishes", start: true, fn: swap},
		{name: "nothing-pending", fn: swap, wantErr: store.ErrNotFound},
		{name: "fn-fails", start: true, fn: func(*store.Volume, store.Rotation) error { return errFn }, wantErr: errFn},
		{name: "audit-fails", start: true, fn: swap, next: failNext, wantErr: errNext},
		{name: "changes-owner", start: true, fn: func(v *store.Volume, _ store.Rotation) error { v.VM = "vm2"; return nil }, wantErr: store.ErrImmutable},
		{name: "drops-key", start: true, fn: func(v *store.Volume, _ store.Rotation) error { v.SealedUK, v.RotationPending = nil, false; return nil }, wantErr: store.ErrImmutable},
		{name: "stays-pending", start: true, fn: func(v *store.Volume, r store.Rotation) error { v.SealedUK = r.SealedUK; return nil }, wantErr: store.ErrImmutable},
		{name: "cancels", start: true, fn: func(v *store.Volume, _ store.Rotation) error {
			v.RotationPending, v.MAC = false, []byte("mac2")
			return nil
		}, key: "old"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx := context.Background()
			s := rotationFixture(t, forEachCase(t, b))
			if tt.start {
				if _, err := s.StartRotation(ctx, "v1", startWith([]byte("new")), nextRecord("rotate")); err != nil {
					t.Fatal(err)
				}
			}
			next := tt.next
			if next == nil {
				next = nextRecord("rotate")
			}
			before := auditCount(t, s)
			v, err := s.FinishRotation(ctx, "v1", tt.fn, next)
			if !errors.Is(err, tt.wantErr) || (tt.wantErr == nil) != (err == nil) {
				t.Fatalf("FinishRotation: %v, want %v", err, tt.wantErr)
			}
			stored, gerr := s.GetVolume(ctx, "v1")
			if gerr != nil {
				t.Fatal(gerr)
			}
			_, rerr := s.GetRotation(ctx, "v1")
			if err == nil {
				want := tt.key
				if want == "" {
					want = "resealed:new"
				}
				if string(stored.SealedUK) != want || !bytes.Equal(stored.MAC, []byte("mac2")) || !bytes.Equal(v.SealedUK, stored.SealedUK) || stored.RotationPending || stored.Rotation != 1 {
					t.Fatalf("volume after finish: %+v", stored)
				}
				if !errors.Is(rerr, store.ErrNotFound) {
					t.Fatalf("the rotation is still pending after finish: %v", rerr)
				}
				if n := auditCount(t, s); n != before+1 {
					t.Fatalf("audit records %d -> %d, want one more", before, n)
				}
				return
			}
			if !bytes.Equal(stored.SealedUK, []byte("old")) {
				t.Fatalf("a failed finish changed the key: %q", stored.SealedUK)
			}
			if tt.start && rerr != nil {
				t.Fatalf("a failed finish lost the pending key: %v", rerr)
			}
			if n := auditCount(t, s); n != before {
				t.Fatalf("audit records %d -> %d after a failed finish", before, n)
			}
		})
	}
}

// TestEraseDestroysPendingKey: crypto-erase takes the pending UK with it.
func TestEraseDestroysPendingKey(t *testing.T) { each(t, testEraseDestroysPendingKey) }

func testEraseDestroysPendingKey(t *testing.T, s store.Backend) {
	ctx := context.Background()
	if _, err := s.CreateVM(ctx, store.VM{Name: "vm1", EKPubPEM: "ek"}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateVolume(ctx, store.Volume{ID: "v1", VM: "vm1", SealedUK: []byte("old")}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.StartRotation(ctx, "v1", startWith([]byte("pending-key")), nextRecord("rotate")); err != nil {
		t.Fatal(err)
	}
	if _, err := s.UpdateVolume(ctx, "v1", func(v *store.Volume) error { v.SealedUK = nil; return nil }); err != nil {
		t.Fatal(err)
	}
	if _, err := s.GetRotation(ctx, "v1"); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("pending key after erase: %v, want ErrNotFound", err)
	}
	if pend, err := s.PendingRotations(ctx); err != nil || len(pend) != 0 {
		t.Fatalf("pending rotations after erase: %v, %v", pend, err)
	}
	if _, err := s.FinishRotation(ctx, "v1", func(*store.Volume, store.Rotation) error { return nil }, nextRecord("rotate")); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("finish after erase: %v, want ErrNotFound", err)
	}
}

// TestRotationGenerations: each rotation begun takes the volume's next
// generation, which only the rotation methods change; a start that does
// not take it, an update that changes more than the released and
// cancelling state, and an UpdateVolume that touches the rotation state
// are refused.
func TestRotationGenerations(t *testing.T) { forEachBackend(t, testRotationGenerations) }

func testRotationGenerations(t *testing.T, b backend) {
	ctx := context.Background()
	s := rotationFixture(t, forEachCase(t, b))
	end := func(v *store.Volume, _ store.Rotation) error { v.RotationPending = false; return nil }
	for gen := uint64(1); gen <= 2; gen++ {
		r, err := s.StartRotation(ctx, "v1", startWith([]byte("k")), nextRecord("rotate"))
		if err != nil || r.Generation != gen || !bytes.Equal(r.MAC, []byte("rotation-mac")) {
			t.Fatalf("start %d: %+v, %v", gen, r, err)
		}
		v, err := s.GetVolume(ctx, "v1")
		if err != nil || v.Rotation != gen || !v.RotationPending || !bytes.Equal(v.MAC, []byte("volume-mac")) {
			t.Fatalf("volume after start %d: %+v, %v", gen, v, err)
		}
		if _, err := s.UpdateVolume(ctx, "v1", func(v *store.Volume) error { v.RotationPending = false; return nil }); !errors.Is(err, store.ErrImmutable) {
			t.Fatalf("UpdateVolume cleared the pending flag: %v", err)
		}
		for name, fn := range map[string]func(store.Volume, *store.Rotation) error{
			"generation": func(_ store.Volume, r *store.Rotation) error { r.Generation++; return nil },
			"key":        func(_ store.Volume, r *store.Rotation) error { r.SealedUK = []byte("other"); return nil },
		} {
			if _, err := s.UpdateRotation(ctx, "v1", fn, nil); !errors.Is(err, store.ErrImmutable) {
				t.Fatalf("UpdateRotation changed the %s: %v", name, err)
			}
		}
		before := auditCount(t, s)
		u, err := s.UpdateRotation(ctx, "v1", func(v store.Volume, r *store.Rotation) error {
			if v.Rotation != gen {
				t.Errorf("UpdateRotation saw generation %d, want %d", v.Rotation, gen)
			}
			r.Released, r.Cancelling, r.MAC = true, true, []byte("mac3")
			return nil
		}, nextRecord("rotate"))
		if err != nil || !u.Released || !u.Cancelling {
			t.Fatalf("UpdateRotation: %+v, %v", u, err)
		}
		if got, err := s.GetRotation(ctx, "v1"); err != nil || !got.Released || !got.Cancelling || !bytes.Equal(got.MAC, []byte("mac3")) || got.Generation != gen {
			t.Fatalf("rotation after update: %+v, %v", got, err)
		}
		if n := auditCount(t, s); n != before+1 {
			t.Fatalf("audit records %d -> %d, want one more", before, n)
		}
		if all, err := s.ListRotations(ctx); err != nil || len(all) != 1 || all[0].Generation != gen {
			t.Fatalf("ListRotations: %+v, %v", all, err)
		}
		if _, err := s.FinishRotation(ctx, "v1", end, nextRecord("rotate")); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := s.UpdateRotation(ctx, "v1", func(store.Volume, *store.Rotation) error { return nil }, nil); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("UpdateRotation with nothing pending: %v", err)
	}
	bad := func(v *store.Volume, r *store.Rotation) error {
		v.RotationPending = true
		r.Generation, r.SealedUK = v.Rotation, []byte("k")
		return nil
	}
	if _, err := s.StartRotation(ctx, "v1", bad, nextRecord("rotate")); !errors.Is(err, store.ErrImmutable) {
		t.Fatalf("a start that reuses the generation: %v, want ErrImmutable", err)
	}
}
