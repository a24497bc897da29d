package client

import (
	"context"
	"testing"
	"time"
)

// TestRotateMasterKey drives a master-key rotation of a real service
// through the client: it begins, the fingerprint changes when it is done,
// and the audit chain verifies.
func TestRotateMasterKey(t *testing.T) {
	s := startService(t)
	c, err := New(Config{URLs: []string{s.adminURL()}, CA: s.ca, Token: s.token})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	before, err := c.MasterKey(ctx)
	if err != nil || before.Kind != "file" || before.Rotation != nil {
		t.Fatalf("master key: %+v %v", before, err)
	}
	started, err := c.RotateMasterKey(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if started.Rotation == nil && started.Fingerprint == before.Fingerprint {
		t.Fatalf("rotate answered %+v: neither under way nor done", started)
	}
	after := started
	for i := 0; after.Rotation != nil; i++ {
		if i == 1000 {
			t.Fatal("the rotation did not finish")
		}
		if !after.Rotation.Running && after.Rotation.Error != "" {
			t.Fatalf("rotation stopped: %s", after.Rotation.Error)
		}
		time.Sleep(20 * time.Millisecond)
		if after, err = c.MasterKey(ctx); err != nil {
			t.Fatal(err)
		}
	}
	if after.Fingerprint == before.Fingerprint {
		t.Fatal("fingerprint unchanged after the rotation")
	}
	rep, err := c.AuditVerify(ctx)
	if err != nil || !rep.OK {
		t.Fatalf("audit verify: %+v %v", rep, err)
	}
}
