package store_test

import (
	"context"
	"errors"
	"fmt"
	"reflect"
	"sync"
	"testing"
	"time"

	"github.com/keygate/keygate/keysvc/store"
)

// TestAppendAuditUsingThenRead: the append commits as AppendAuditUsing's
// does, and the read after it returns what GetVMAndVolume returns then,
// each caller its own pair even when many share a batch.
func TestAppendAuditUsingThenRead(t *testing.T) { each(t, testAppendAuditUsingThenRead) }

func testAppendAuditUsingThenRead(t *testing.T, s store.Backend) {
	ctx := context.Background()
	exp := time.Now().Add(time.Hour)
	const n = 40
	for i := range n {
		if _, err := s.CreateVM(ctx, store.VM{Name: fmt.Sprintf("vm-%d", i), EKPubPEM: fmt.Sprintf("ek-%d", i)}); err != nil {
			t.Fatal(err)
		}
		if _, err := s.CreateVolume(ctx, store.Volume{ID: fmt.Sprintf("vol-%d", i), VM: fmt.Sprintf("vm-%d", i), SealedUK: []byte{byte(i)}}); err != nil {
			t.Fatal(err)
		}
	}
	boom := errors.New("boom")
	failing := func(*store.AuditRecord, *store.AuditHead) (store.AuditRecord, store.AuditHead, error) {
		return store.AuditRecord{}, store.AuditHead{}, boom
	}
	for _, tc := range []struct {
		name          string
		challenge, vm string
		vol           string
		next          store.AuditNext
		wantErr       error // the append's
		wantReadErr   error // wrapped in ErrReadAfterAppend, after a committed append
		wantVol       bool
	}{
		{"vm and volume", "c1", "vm-1", "vol-1", chained("a"), nil, nil, true},
		{"another vm's volume", "c2", "vm-1", "vol-2", chained("a"), nil, nil, true},
		{"no volume", "c3", "vm-1", "nope", chained("a"), nil, nil, false},
		{"no vm: committed, read fails", "c4", "nobody", "vol-1", chained("a"), nil, store.ErrNotFound, false},
		{"replay", "c1", "vm-1", "vol-1", chained("a"), store.ErrChallengeUsed, nil, false},
		{"failing next", "c5", "vm-1", "vol-1", failing, boom, nil, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := countAudit(t, s)
			vm, vol, err := s.AppendAuditUsingThenRead(ctx, store.ChallengeUse{ID: tc.challenge, Expires: exp}, tc.next, tc.vm, tc.vol)
			after := countAudit(t, s)
			switch {
			case tc.wantErr != nil:
				if !errors.Is(err, tc.wantErr) || errors.Is(err, store.ErrReadAfterAppend) {
					t.Fatalf("error %v, want %v", err, tc.wantErr)
				}
				if after != before {
					t.Fatalf("a refused append wrote %d records", after-before)
				}
				return
			case tc.wantReadErr != nil:
				if !errors.Is(err, store.ErrReadAfterAppend) || !errors.Is(err, tc.wantReadErr) {
					t.Fatalf("error %v, want ErrReadAfterAppend wrapping %v", err, tc.wantReadErr)
				}
			case err != nil:
				t.Fatal(err)
			}
			if after != before+1 {
				t.Fatalf("%d records appended, want 1", after-before)
			}
			if used, err := s.ChallengeUsed(ctx, tc.challenge); err != nil || !used {
				t.Fatalf("challenge %s used=%v (%v) after the append", tc.challenge, used, err)
			}
			if tc.wantReadErr != nil {
				return
			}
			wantVM, wantVol, err := s.GetVMAndVolume(ctx, tc.vm, tc.vol)
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(vm, wantVM) || !reflect.DeepEqual(vol, wantVol) || (vol != nil) != tc.wantVol {
				t.Fatalf("read %+v %+v, GetVMAndVolume %+v %+v", vm, vol, wantVM, wantVol)
			}
		})
	}
	t.Run("concurrent", func(t *testing.T) {
		// Enough at once that the PostgreSQL writer batches them: each must
		// get its own VM and volume back.
		var wg sync.WaitGroup
		errs := make([]error, n)
		for i := range n {
			wg.Go(func() {
				vm, vol, err := s.AppendAuditUsingThenRead(ctx, store.ChallengeUse{ID: fmt.Sprintf("cc-%d", i), Expires: exp}, chained("c"),
					fmt.Sprintf("vm-%d", i), fmt.Sprintf("vol-%d", i))
				switch {
				case err != nil:
					errs[i] = err
				case vm.Name != fmt.Sprintf("vm-%d", i) || vm.EKPubPEM != fmt.Sprintf("ek-%d", i) || vol == nil ||
					vol.ID != fmt.Sprintf("vol-%d", i) || !reflect.DeepEqual(vol.SealedUK, []byte{byte(i)}):
					errs[i] = fmt.Errorf("append %d read %+v %+v", i, vm, vol)
				}
			})
		}
		wg.Wait()
		if err := errors.Join(errs...); err != nil {
			t.Fatal(err)
		}
	})
}

func countAudit(t *testing.T, s store.Backend) int {
	t.Helper()
	n := 0
	if _, err := s.ScanAudit(context.Background(), 1, func(store.AuditRecord) error { n++; return nil }); err != nil {
		t.Fatal(err)
	}
	return n
}
