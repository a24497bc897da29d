package store_test

import (
	"bytes"
	"context"
	"errors"
	"testing"

	"github.com/keygate/keygate/keysvc/store"
)

// auditCount is how many audit records the store holds.
func auditCount(t *testing.T, s *store.SQLite) int {
	t.Helper()
	n := 0
	if _, err := s.ScanAudit(context.Background(), 0, func(store.AuditRecord) error { n++; return nil }); err != nil {
		t.Fatal(err)
	}
	return n
}

// rotationFixture is a store with VM vm1 and volumes v1 (with key "old")
// and gone (erased).
func rotationFixture(t *testing.T) *store.SQLite {
	t.Helper()
	ctx := context.Background()
	s := openStore(t, t.TempDir())
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

func failNext(*store.AuditRecord, *store.AuditHead) (store.AuditRecord, store.AuditHead, error) {
	return store.AuditRecord{}, store.AuditHead{}, errNext
}

// TestStartRotation: a pending UK is stored with its audit record, or
// neither; one at a time; never for a missing or erased volume.
func TestStartRotation(t *testing.T) {
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
			s := rotationFixture(t)
			next := tt.next
			if next == nil {
				next = nextRecord("rotate")
			}
			if tt.twice {
				if _, err := s.StartRotation(ctx, store.Rotation{Volume: tt.volume, SealedUK: []byte("first")}, nextRecord("rotate")); err != nil {
					t.Fatal(err)
				}
			}
			before := auditCount(t, s)
			r, err := s.StartRotation(ctx, store.Rotation{Volume: tt.volume, SealedUK: tt.sealed}, next)
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
func TestFinishRotation(t *testing.T) {
	swap := func(v *store.Volume, r store.Rotation) error {
		v.SealedUK, v.MAC = append([]byte("resealed:"), r.SealedUK...), []byte("mac2")
		return nil
	}
	errFn := errors.New("fn refused")
	tests := []struct {
		name    string
		start   bool
		fn      func(*store.Volume, store.Rotation) error
		next    store.AuditNext
		wantErr error
	}{
		{name: "finishes", start: true, fn: swap},
		{name: "nothing-pending", fn: swap, wantErr: store.ErrNotFound},
		{name: "fn-fails", start: true, fn: func(*store.Volume, store.Rotation) error { return errFn }, wantErr: errFn},
		{name: "audit-fails", start: true, fn: swap, next: failNext, wantErr: errNext},
		{name: "changes-owner", start: true, fn: func(v *store.Volume, _ store.Rotation) error { v.VM = "vm2"; return nil }, wantErr: store.ErrImmutable},
		{name: "drops-key", start: true, fn: func(v *store.Volume, _ store.Rotation) error { v.SealedUK = nil; return nil }, wantErr: store.ErrImmutable},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx := context.Background()
			s := rotationFixture(t)
			if tt.start {
				if _, err := s.StartRotation(ctx, store.Rotation{Volume: "v1", SealedUK: []byte("new")}, nextRecord("rotate")); err != nil {
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
				if !bytes.Equal(stored.SealedUK, []byte("resealed:new")) || !bytes.Equal(stored.MAC, []byte("mac2")) || !bytes.Equal(v.SealedUK, stored.SealedUK) {
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
func TestEraseDestroysPendingKey(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	s := openStore(t, dir)
	if _, err := s.CreateVM(ctx, store.VM{Name: "vm1", EKPubPEM: "ek"}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateVolume(ctx, store.Volume{ID: "v1", VM: "vm1", SealedUK: []byte("old")}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.StartRotation(ctx, store.Rotation{Volume: "v1", SealedUK: []byte("pending-key")}, nextRecord("rotate")); err != nil {
		t.Fatal(err)
	}
	if _, err := s.UpdateVolume(ctx, "v1", func(v *store.Volume) error { v.SealedUK = nil; return nil }); err != nil {
		t.Fatal(err)
	}
	if _, err := s.GetRotation(ctx, "v1"); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("pending key after erase: %v, want ErrNotFound", err)
	}
	var n int
	if err := rawDB(t, dir).QueryRow(`SELECT count(*) FROM volume_rotations`).Scan(&n); err != nil || n != 0 {
		t.Fatalf("volume_rotations rows after erase: %d, %v", n, err)
	}
	if _, err := s.FinishRotation(ctx, "v1", func(*store.Volume, store.Rotation) error { return nil }, nextRecord("rotate")); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("finish after erase: %v, want ErrNotFound", err)
	}
}
