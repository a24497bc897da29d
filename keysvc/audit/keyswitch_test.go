package audit_test

import (
	"context"
	"errors"
	"path/filepath"
	"testing"

	"github.com/keygate/keygate/keysvc/audit"
	"github.com/keygate/keygate/keysvc/masterkey"
	"github.com/keygate/keygate/keysvc/store"
)

// TestKeySwitch: across a master-key rotation the chain verifies under
// both keys while the rotation runs, and under the new key alone after,
// with the records before the switch counted as retired; the old key
// alone does not verify what came after, and an edit before the switch is
// still found.
func TestKeySwitch(t *testing.T) {
	ctx := context.Background()
	f := newFixture(t)
	before := len(f.fill(t))
	next, _, err := masterkey.LoadOrCreate(filepath.Join(f.dir, "next.key"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(next.Destroy)
	ev := audit.Event{Actor: "admin", Action: audit.ActionMasterKeyRotate, Subject: "master-key", Details: audit.MasterKeyRotate{Phase: audit.RotateBegin}}
	sw, err := f.log.AppendSwitch(ctx, ev, next, func(n store.AuditNext) error { return f.st.AppendAudit(ctx, n) })
	if err != nil {
		t.Fatal(err)
	}
	f.fill(t)
	if rep, err := f.log.Verify(ctx); err != nil || rep.Retired != 0 {
		t.Fatalf("during the rotation: %+v %v", rep, err)
	}
	f.log.DropPrevious()
	rep, err := f.log.Verify(ctx)
	if err != nil || rep.Retired != uint64(before) {
		t.Fatalf("after: retired %d %v, want %d and no error", rep.Retired, err, before)
	}
	// A Log started afresh on the new key alone (a restart) agrees.
	fresh, err := audit.New(f.st, next)
	if err != nil {
		t.Fatal(err)
	}
	defer fresh.Destroy()
	if rep, err := fresh.Verify(ctx); err != nil || rep.Retired != uint64(before) {
		t.Fatalf("fresh log on the new key: %+v %v", rep, err)
	}
	if _, err := fresh.Append(ctx, sampleEvents[0]); err != nil {
		t.Fatalf("append on the new key: %v", err)
	}
	// The old key alone: everything from the switch on is forged.
	stale, err := audit.New(f.st, f.mk)
	if err != nil {
		t.Fatal(err)
	}
	defer stale.Destroy()
	rep, err = stale.Verify(ctx)
	if !errors.Is(err, audit.ErrTampered) || rep.Problems[0].Seq != sw.Seq || rep.Problems[0].Kind != audit.KindForged {
		t.Fatalf("old key: %+v %v, want forged from seq %d", rep, err, sw.Seq)
	}
	if _, err := stale.Append(ctx, sampleEvents[0]); !errors.Is(err, audit.ErrChainBroken) {
		t.Fatalf("append under the old key: %v, want ErrChainBroken", err)
	}
	// An early record edited behind the service's back is still found,
	// though its MAC can no longer be checked.
	db := f.raw(t)
	mustExec(t, db, `UPDATE audit_log SET subject = 'web-2' WHERE seq = 2`)
	rep, err = fresh.Verify(ctx)
	if !errors.Is(err, audit.ErrTampered) || rep.Problems[0].Seq != 2 {
		t.Fatalf("edit before the switch: %+v %v, want a problem at seq 2", rep, err)
	}
}
