package boot

import (
	"context"
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/keygate/keygate/internal/testutil"
	"github.com/keygate/keygate/internal/tpmtest"
	"github.com/keygate/keygate/keysvc/audit"
	"github.com/keygate/keygate/tpm"
)

// TestReattestLocks: a serving VM re-attests every period; once a policy
// PCR is extended after the unlock (as a runtime measurement would), the
// first re-attestation after it locks the volume, the key service audits
// it, and serving stops. On the simulator and on swtpm.
func TestReattestLocks(t *testing.T) {
	for _, which := range []string{"sim", "swtpm"} {
		t.Run(which, func(t *testing.T) {
			var tp *tpm.TPM
			if which == "sim" {
				tp = openSim(t)
				reboot(t, tp)
			} else {
				sock, _ := testutil.StartSwtpm(t, "")
				tp = tpmtest.Open(t, "swtpm:"+sock)
			}
			reattestLocks(t, tp)
		})
	}
}

func reattestLocks(t *testing.T, tp *tpm.TPM) {
	e := startEnv(t)
	e.enroll(t, tp, "ra", false)
	img := e.volume(t, "ra", "ra-vol")
	ev := newEvents()
	cfg := e.cfg(tp, "ra", img, ev)
	cfg.Poll = time.Hour // the heartbeat stays out of it
	cfg.Reattest = 200 * time.Millisecond
	b, err := Run(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	ev.wait(t, EventReattested)
	if err := tp.Extend(7, []byte("a runtime measurement")); err != nil {
		t.Fatal(err)
	}
	// From here on, no re-attestation passes: the next one locks.
	passed := len(ev.kinds())
	ev.wait(t, EventLocked)
	for _, k := range ev.kinds()[passed:] {
		if k == EventReattested {
			t.Fatal("a re-attestation passed after the PCR was extended")
		}
	}
	err = b.Wait()
	if !errors.Is(err, ErrReattest) || !strings.Contains(err.Error(), "PCR 7") {
		t.Fatalf("Wait: %v, want ErrReattest naming PCR 7", err)
	}
	if err := b.FS().Put("/after", strings.NewReader("x"), 1); err == nil {
		t.Fatal("the filesystem still takes writes after the lock")
	}
	raw, err := e.adm.Audit(context.Background(), 1)
	if err != nil {
		t.Fatal(err)
	}
	var recs []audit.Record
	json.Unmarshal(raw, &recs)
	found := false
	for _, r := range recs {
		if r.Action == audit.ActionReattest && strings.Contains(string(r.Details), `"lock"`) {
			found = true
		}
	}
	if !found {
		t.Fatal("no reattest lock record in the audit chain")
	}
}
