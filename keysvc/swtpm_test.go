package keysvc_test

import (
	"errors"
	"net/http"
	"testing"

	"github.com/keygate/keygate/internal/testutil"
	"github.com/keygate/keygate/keysvc/api"
	"github.com/keygate/keygate/tpm"
)

// startSwtpm starts a swtpm with fresh state (so a different EK from the
// simulator's) and opens it; everything is stopped in Cleanup.
func startSwtpm(t *testing.T) *tpm.TPM {
	t.Helper()
	sock, _ := testutil.StartSwtpm(t, "")
	tp, err := tpm.Open("swtpm:" + sock)
	if err != nil {
		t.Fatalf("open swtpm: %v", err)
	}
	t.Cleanup(func() { tp.Close() })
	return tp
}

// TestStolenBlob: a blob released to the VM (the simulator) does not import
// on another TPM (a swtpm), and that TPM cannot get a challenge in the VM's
// name either.
func TestStolenBlob(t *testing.T) {
	e := startEnv(t, t.TempDir())
	v := openVM(t)
	vol := setup(t, e, v, "victim")
	code, body := e.unlock(t, v, "victim", vol)
	if code != http.StatusOK {
		t.Fatalf("unlock: %d %s", code, body)
	}
	thief := &vmTPM{tpm: startSwtpm(t)}
	if _, err := thief.importBlob(t, body, tpm.ECC); !errors.Is(err, tpm.ErrWrongTPM) {
		t.Fatalf("import on another TPM: %v, want ErrWrongTPM", err)
	}
	ek, err := thief.tpm.EK(tpm.ECC)
	if err != nil {
		t.Fatal(err)
	}
	ekPEM, _ := ek.PEM()
	code, body = e.vm(t, "POST", "/v1/challenge", api.ChallengeRequest{VM: "victim", Volume: vol, EKPub: string(ekPEM), AKPub: v.akPEM})
	wantRefusal(t, code, body, api.ReasonUnknownEK)
}
