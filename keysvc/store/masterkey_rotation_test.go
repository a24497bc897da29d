package store_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/keygate/keygate/keysvc/store"
)

// mkFixture is a store on b's database with VMs vm-0..vm-(n-1), each with
// volume vol-i (vol-0 erased), the master key "old" claimed, and a
// rotation from "old" to "new" begun.
func mkFixture(t *testing.T, b backend, n int) store.Backend {
	t.Helper()
	ctx := context.Background()
	s := b.open(t)
	for i := range n {
		if _, err := s.CreateVM(ctx, store.VM{Name: fmt.Sprintf("vm-%d", i), EKPubPEM: "ek", Policy: []byte(`{}`)}); err != nil {
			t.Fatal(err)
		}
		if _, err := s.CreateVolume(ctx, store.Volume{ID: fmt.Sprintf("vol-%d", i), VM: fmt.Sprintf("vm-%d", i), SealedUK: []byte("old-uk")}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := s.UpdateVolume(ctx, "vol-0", func(v *store.Volume) error { v.SealedUK = nil; return nil }); err != nil {
		t.Fatal(err)
	}
	if _, err := s.ClaimMasterKey(ctx, []byte("old")); err != nil {
		t.Fatal(err)
	}
	keep := func(a store.Anchor) store.Anchor { return a }
	if err := s.BeginMasterKeyRotation(ctx, store.MasterKeyRotation{OldKey: "old", NewKey: "new", Started: t0}, keep, nextRecord("mk-begin")); err != nil {
		t.Fatal(err)
	}
	return s
}

func rekeyVM(v *store.VM) error { v.MAC = []byte("new-mac"); return nil }

func rekeyVol(v *store.Volume) error {
	v.MAC = []byte("new-mac")
	if !v.Erased() {
		v.SealedUK = []byte("new-uk")
	}
	return nil
}

// TestBeginMasterKeyRotation: the rotation row, the anchor's new MAC and
// the audit record are stored together; one rotation at a time.
func TestBeginMasterKeyRotation(t *testing.T) { forEachBackend(t, testBeginMasterKeyRotation) }

func testBeginMasterKeyRotation(t *testing.T, b backend) {
	remac := func(a store.Anchor) store.Anchor { a.MAC = []byte("anchor-new"); return a }
	tests := []struct {
		name    string
		anchor  func(store.Anchor) store.Anchor
		next    store.AuditNext
		twice   bool
		wantErr error
	}{
		{name: "begins", anchor: remac},
		{name: "one-at-a-time", anchor: remac, twice: true, wantErr: store.ErrExists},
		{name: "audit-fails", anchor: remac, next: failNext, wantErr: errNext},
		{name: "anchor-moved", anchor: func(a store.Anchor) store.Anchor { a.GenesisSeq++; return a }, wantErr: store.ErrImmutable},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx := context.Background()
			s := forEachCase(t, b).open(t)
			if err := s.Adopt(ctx, rekeyVM, rekeyVol, nextRecord("adopt"), func(r store.AuditRecord) store.Anchor {
				return store.Anchor{Created: t0, GenesisSeq: r.Seq, GenesisHash: r.Hash, MAC: []byte("anchor-old")}
			}); err != nil {
				t.Fatal(err)
			}
			r := store.MasterKeyRotation{OldKey: "old", NewKey: "new", Started: t0}
			if tt.twice {
				if err := s.BeginMasterKeyRotation(ctx, r, remac, nextRecord("mk-begin")); err != nil {
					t.Fatal(err)
				}
			}
			next := tt.next
			if next == nil {
				next = nextRecord("mk-begin")
			}
			before := auditCount(t, s)
			err := s.BeginMasterKeyRotation(ctx, store.MasterKeyRotation{OldKey: "old", NewKey: "other", Started: t0}, tt.anchor, next)
			if !errors.Is(err, tt.wantErr) || (tt.wantErr == nil) != (err == nil) {
				t.Fatalf("BeginMasterKeyRotation: %v, want %v", err, tt.wantErr)
			}
			got, gerr := s.MasterKeyRotation(ctx)
			a, aerr := s.Anchor(ctx)
			if gerr != nil || aerr != nil {
				t.Fatal(gerr, aerr)
			}
			switch {
			case err == nil:
				if got == nil || got.NewKey != "other" || !got.Started.Equal(t0) || got.VMCursor != "" || got.VMs != 0 {
					t.Fatalf("rotation after begin: %+v", got)
				}
				if !bytes.Equal(a.MAC, []byte("anchor-new")) || auditCount(t, s) != before+1 {
					t.Fatalf("anchor MAC %q, audit records %d -> %d; want the new MAC and one record", a.MAC, before, auditCount(t, s))
				}
			case tt.twice:
				if got == nil || got.NewKey != "new" {
					t.Fatalf("the rotation under way was replaced: %+v", got)
				}
			default:
				if got != nil || !bytes.Equal(a.MAC, []byte("anchor-old")) || auditCount(t, s) != before {
					t.Fatalf("a failed begin left rotation %+v, anchor MAC %q, %d -> %d records", got, a.MAC, before, auditCount(t, s))
				}
			}
		})
	}
}

// TestRekeyBatch: batches walk VMs then volumes in key order, each batch's
// rows and cursors stored together; a callback that changes more than the
// MAC (and a volume's sealed UK) stores nothing.
func TestRekeyBatch(t *testing.T) { forEachBackend(t, testRekeyBatch) }

func testRekeyBatch(t *testing.T, b backend) {
	ctx := context.Background()
	s := mkFixture(t, forEachCase(t, b), 3)
	if _, _, err := s.RekeyBatch(ctx, 0, rekeyVM, rekeyVol); err == nil {
		t.Fatal("a batch of 0 rows was accepted")
	}
	// Refused callbacks: nothing stored, cursors unmoved.
	bad := []struct {
		name string
		vm   func(*store.VM) error
		vol  func(*store.Volume) error
	}{
		{"vm-revoked", func(v *store.VM) error { v.Revoked = true; return nil }, rekeyVol},
		{"vm-fails", func(*store.VM) error { return errNext }, rekeyVol},
	}
	for _, c := range bad {
		if _, _, err := s.RekeyBatch(ctx, 10, c.vm, c.vol); err == nil {
			t.Fatalf("%s: accepted", c.name)
		}
	}
	if r, _ := s.MasterKeyRotation(ctx); r.VMCursor != "" || r.VMs != 0 {
		t.Fatalf("a refused batch moved the cursors: %+v", r)
	}
	if v, _ := s.GetVM(ctx, "vm-0"); v.MAC != nil || v.Revoked {
		t.Fatalf("a refused batch wrote vm-0: %+v", v)
	}

	want := []struct {
		vmCursor, volCursor string
		vms, vols           int
		done                bool
	}{
		{"vm-1", "", 2, 0, false},
		{"vm-2", "vol-0", 3, 1, false},
		{"vm-2", "vol-2", 3, 3, false}, // full to the last row: the next finds nothing
		{"vm-2", "vol-2", 3, 3, true},
	}
	for i, w := range want {
		if i == 2 {
			// Between batches: a volume callback that changes the owner.
			if _, _, err := s.RekeyBatch(ctx, 2, rekeyVM, func(v *store.Volume) error { v.VM = "vm-0"; return nil }); !errors.Is(err, store.ErrImmutable) {
				t.Fatalf("owner change: %v, want ErrImmutable", err)
			}
		}
		r, done, err := s.RekeyBatch(ctx, 2, rekeyVM, rekeyVol)
		if err != nil {
			t.Fatal(err)
		}
		if r.VMCursor != w.vmCursor || r.VolumeCursor != w.volCursor || r.VMs != w.vms || r.Volumes != w.vols || done != w.done {
			t.Fatalf("batch %d: %+v done=%v; want %+v", i+1, r, done, w)
		}
		if stored, _ := s.MasterKeyRotation(ctx); *stored != r {
			t.Fatalf("batch %d: stored %+v, returned %+v", i+1, *stored, r)
		}
	}
	for i := range 3 {
		v, err := s.GetVolume(ctx, fmt.Sprintf("vol-%d", i))
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(v.MAC, []byte("new-mac")) || i > 0 && !bytes.Equal(v.SealedUK, []byte("new-uk")) || i == 0 && !v.Erased() {
			t.Fatalf("vol-%d after the batches: %+v", i, v)
		}
	}
}

// TestFinishMasterKeyRotation: the rotation row goes, the audit record is
// stored and the new key becomes the one the database records, together.
func TestFinishMasterKeyRotation(t *testing.T) { forEachBackend(t, testFinishMasterKeyRotation) }

func testFinishMasterKeyRotation(t *testing.T, b backend) {
	for _, tt := range []struct {
		name    string
		next    store.AuditNext
		wantErr error
		wantFP  string
	}{
		{name: "finishes", next: nextRecord("mk-finish"), wantFP: "new"},
		{name: "audit-fails", next: failNext, wantErr: errNext, wantFP: "old"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			ctx := context.Background()
			s := mkFixture(t, forEachCase(t, b), 1)
			before := auditCount(t, s)
			err := s.FinishMasterKeyRotation(ctx, tt.next)
			if !errors.Is(err, tt.wantErr) || (tt.wantErr == nil) != (err == nil) {
				t.Fatalf("FinishMasterKeyRotation: %v, want %v", err, tt.wantErr)
			}
			fp, cerr := s.ClaimMasterKey(ctx, []byte("someone-else"))
			r, rerr := s.MasterKeyRotation(ctx)
			if cerr != nil || rerr != nil {
				t.Fatal(cerr, rerr)
			}
			if string(fp) != tt.wantFP || (r == nil) != (err == nil) {
				t.Fatalf("after finish: fingerprint %q, rotation %+v; want %q", fp, r, tt.wantFP)
			}
			if n := auditCount(t, s); (err == nil) != (n == before+1) {
				t.Fatalf("audit records %d -> %d", before, n)
			}
			if err == nil {
				if err := s.FinishMasterKeyRotation(ctx, nextRecord("mk-finish")); !errors.Is(err, store.ErrNotFound) {
					t.Fatalf("second finish: %v, want ErrNotFound", err)
				}
				if _, _, err := s.RekeyBatch(ctx, 1, rekeyVM, rekeyVol); !errors.Is(err, store.ErrNotFound) {
					t.Fatalf("batch after finish: %v, want ErrNotFound", err)
				}
			}
		})
	}
}

// TestRekeyRotations: a master-key rotation re-seals the pending unwrap
// keys in one transaction; a callback that fails or changes the volume
// stores none.
func TestRekeyRotations(t *testing.T) { forEachBackend(t, testRekeyRotations) }

func testRekeyRotations(t *testing.T, b backend) {
	ctx := context.Background()
	s := mkFixture(t, forEachCase(t, b), 3)
	for _, id := range []string{"vol-1", "vol-2"} {
		if _, err := s.StartRotation(ctx, id, startWith([]byte("pending-old")), nextRecord("rotate")); err != nil {
			t.Fatal(err)
		}
	}
	for name, fn := range map[string]func(*store.Rotation) error{
		"fails":        func(r *store.Rotation) error { return errNext },
		"moves-volume": func(r *store.Rotation) error { r.Volume = "vol-0"; return nil },
		"drops-key": func(r *store.Rotation) error {
			if r.Volume == "vol-2" {
				r.SealedUK = nil
			}
			return nil
		},
	} {
		if n, err := s.RekeyRotations(ctx, fn); err == nil || n != 0 {
			t.Fatalf("%s: %d, %v; want an error and none", name, n, err)
		}
		if r, _ := s.GetRotation(ctx, "vol-1"); !bytes.Equal(r.SealedUK, []byte("pending-old")) {
			t.Fatalf("%s: vol-1's pending key became %q", name, r.SealedUK)
		}
	}
	n, err := s.RekeyRotations(ctx, func(r *store.Rotation) error { r.SealedUK = []byte("pending-new:" + r.Volume); return nil })
	if err != nil || n != 2 {
		t.Fatalf("RekeyRotations = %d, %v; want 2", n, err)
	}
	for _, id := range []string{"vol-1", "vol-2"} {
		if r, err := s.GetRotation(ctx, id); err != nil || string(r.SealedUK) != "pending-new:"+id {
			t.Fatalf("%s after re-sealing: %+v, %v", id, r, err)
		}
	}
}

// TestReplicasRekeyOnce: two replicas running a master-key rotation's
// batches at once on one PostgreSQL database re-key every row exactly once
// and agree on the counts.
func TestReplicasRekeyOnce(t *testing.T) {
	ctx := context.Background()
	url := replicasURL(t)
	be := backend{name: "postgres", url: url}
	a := mkFixture(t, be, 40)
	b := be.open(t)
	var (
		mu   sync.Mutex
		seen = map[string]int{}
		wg   sync.WaitGroup
		errs = make(chan error, 2)
	)
	count := func(key string) {
		mu.Lock()
		seen[key]++
		mu.Unlock()
	}
	// A callback runs inside its batch's transaction; one that committed
	// is counted once per row it stored, so callbacks of a batch that
	// failed would show as extra counts (none fail here).
	for _, s := range []store.Backend{a, b} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				_, done, err := s.RekeyBatch(ctx, 3,
					func(v *store.VM) error { count("vm:" + v.Name); time.Sleep(time.Millisecond); return rekeyVM(v) },
					func(v *store.Volume) error { count("vol:" + v.ID); return rekeyVol(v) })
				if err != nil {
					errs <- err
					return
				}
				if done {
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	if len(seen) != 80 {
		t.Fatalf("%d rows re-keyed, want 80", len(seen))
	}
	for k, n := range seen {
		if n != 1 {
			t.Errorf("%s re-keyed %d times", k, n)
		}
	}
	r, err := a.MasterKeyRotation(ctx)
	if err != nil || r.VMs != 40 || r.Volumes != 40 {
		t.Fatalf("rotation after both replicas: %+v, %v; want 40 VMs and 40 volumes", r, err)
	}
}
