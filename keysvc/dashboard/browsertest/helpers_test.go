package browsertest

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"io"
	"log/slog"
	"net/http"
	"strconv"
	"testing"
	"time"

	"github.com/keygate/keygate/keysvc/api"
	"github.com/keygate/keygate/tpm"
)

func quiet() *slog.Logger { return slog.New(slog.DiscardHandler) }

// adminClient calls the admin API with the token.
type adminClient struct {
	t     *testing.T
	base  string
	token string
	ca    []byte
	hc    *http.Client
}

func (a *adminClient) do(method, path string, body any, want int) []byte {
	a.t.Helper()
	if a.hc == nil {
		pool := x509.NewCertPool()
		pool.AppendCertsFromPEM(a.ca)
		tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS13}}
		a.t.Cleanup(tr.CloseIdleConnections)
		a.hc = &http.Client{Transport: tr, Timeout: 30 * time.Second}
	}
	var rd io.Reader
	if body != nil {
		b, _ := json.Marshal(body)
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequest(method, a.base+path, rd)
	if err != nil {
		a.t.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer "+a.token)
	resp, err := a.hc.Do(req)
	if err != nil {
		a.t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != want {
		a.t.Fatalf("%s %s: %d %s, want %d", method, path, resp.StatusCode, b, want)
	}
	return b
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
	a.do("POST", "/v1/admin/vms", api.EnrollRequest{Name: name, EKPub: string(ekPEM), AKPub: string(akPEM)}, http.StatusCreated)
	got, err := tp.PCRs(policyPCRs...)
	if err != nil {
		a.t.Fatal(err)
	}
	m := map[string][]string{}
	for i, v := range got.GetPcrs() {
		m[strconv.Itoa(int(i))] = []string{hex.EncodeToString(v)}
	}
	a.do("PUT", "/v1/admin/vms/"+name+"/policy", map[string]any{"pcrs": m}, http.StatusOK)
}

// audit returns the audit chain's records as JSON.
func (a *adminClient) audit() string {
	a.t.Helper()
	return string(a.do("GET", "/v1/admin/audit", nil, http.StatusOK))
}
