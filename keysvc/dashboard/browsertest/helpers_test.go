package browsertest

import (
	"context"
	"encoding/hex"
	"log/slog"
	"strconv"
	"testing"

	"github.com/keygate/keygate/keysvc/api"
	"github.com/keygate/keygate/keysvc/client"
	"github.com/keygate/keygate/tpm"
)

func quiet() *slog.Logger { return slog.New(slog.DiscardHandler) }

// adminClient calls the admin API with the token, through keysvc/client.
type adminClient struct {
	t    *testing.T
	base string
	cl   *client.Client
}

func newAdminClient(t *testing.T, base, token string, ca []byte) *adminClient {
	cl, err := client.New(client.Config{URLs: []string{base}, CA: ca, Token: token})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(cl.Close)
	return &adminClient{t: t, base: base, cl: cl}
}

// policyPCRs: two boot PCRs and the window PCR, which makes a second
// unlock in one boot fail.
var policyPCRs = []int{0, 7, tpm.WindowPCR}

// enroll enrolls tp as VM name with a policy allowing tp's current values
// of policyPCRs.
func (a *adminClient) enroll(tp *tpm.TPM, name string) {
	a.t.Helper()
	ek, err := tp.EK(tpm.ECC)
	if err != nil {
		a.t.Fatal(err)
	}
	ak, err := tp.AK(tpm.ECC)
	if err != nil {
		a.t.Fatal(err)
	}
	ekPEM, _ := ek.PEM()
	akPEM, _ := ak.PEM()
	ctx := context.Background()
	if _, err := a.cl.EnrollVM(ctx, api.EnrollRequest{Name: name, EKPub: string(ekPEM), AKPub: string(akPEM)}); err != nil {
		a.t.Fatal(err)
	}
	got, err := tp.PCRs(policyPCRs...)
	if err != nil {
		a.t.Fatal(err)
	}
	m := map[string][]string{}
	for i, v := range got.GetPcrs() {
		m[strconv.Itoa(int(i))] = []string{hex.EncodeToString(v)}
	}
	if err := a.cl.SetPolicy(ctx, name, map[string]any{"pcrs": m}); err != nil {
		a.t.Fatal(err)
	}
}

// audit returns the audit chain's records as JSON.
func (a *adminClient) audit() []byte {
	a.t.Helper()
	b, err := a.cl.Audit(context.Background(), 1)
	if err != nil {
		a.t.Fatal(err)
	}
	return b
}
