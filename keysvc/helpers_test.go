package keysvc_test

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/keygate/keygate/internal/tpmtest"
	"github.com/keygate/keygate/keysvc/api"

	tpmpb "github.com/google/go-tpm-tools/proto/tpm"
	"google.golang.org/protobuf/proto"

	"github.com/keygate/keygate/keysvc"
	"github.com/keygate/keygate/tpm"
)

// clock is a settable clock for challenge expiry.
type clock struct {
	mu  sync.Mutex
	off time.Duration
}

func (c *clock) Now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return time.Now().Add(c.off) }
func (c *clock) Add(d time.Duration) {
	c.mu.Lock()
	c.off += d
	c.mu.Unlock()
}

// env is a key service running on random 127.0.0.1 ports over real TLS.
type env struct {
	svc    *keysvc.Service
	ca     [32]byte // SHA-256 of the service CA (DER), which quotes bind
	dir    string
	clock  *clock
	client *http.Client
	token  string
}

func startEnv(t testing.TB, dir string, opts ...keysvc.Option) *env {
	t.Helper()
	return startEnvWith(t, keysvc.Config{DataDir: dir}, opts...)
}

// startEnvConfig is startEnv with more of the Config set (a PKCS#11 token).
func startEnvConfig(t testing.TB, cfg keysvc.Config, opts ...keysvc.Option) *env {
	t.Helper()
	return startEnvWith(t, cfg, opts...)
}

// startEnvWith is startEnv with cfg's database, hostnames, logger and key.
func startEnvWith(t testing.TB, cfg keysvc.Config, opts ...keysvc.Option) *env {
	t.Helper()
	c := &clock{}
	dir := cfg.DataDir
	cfg.Listen, cfg.AdminListen = "127.0.0.1:0", "127.0.0.1:0"
	if cfg.Logger == nil {
		cfg.Logger = discardLogger()
	}
	cfg.Options = append([]keysvc.Option{keysvc.WithClock(c.Now), keysvc.WithChallengeTTL(time.Minute)}, opts...)
	svc, err := keysvc.Start(context.Background(), cfg)
	if err != nil {
		t.Fatalf("start: %v", err)
	}
	stopped := false
	t.Cleanup(func() {
		if !stopped {
			svc.Shutdown(context.Background())
		}
	})
	caPEM, err := os.ReadFile(filepath.Join(dir, keysvc.CAFile))
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		t.Fatal("ca.pem holds no certificate")
	}
	blk, _ := pem.Decode(caPEM)
	tok, err := os.ReadFile(filepath.Join(dir, keysvc.AdminTokenFile))
	if err != nil {
		t.Fatal(err)
	}
	tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS13}, MaxIdleConnsPerHost: 256}
	t.Cleanup(tr.CloseIdleConnections)
	return &env{svc: svc, ca: sha256.Sum256(blk.Bytes), dir: dir, clock: c, client: &http.Client{Transport: tr, Timeout: 30 * time.Second}, token: strings.TrimSpace(string(tok))}
}

func (e *env) stop(t testing.TB) {
	t.Helper()
	if err := e.svc.Shutdown(context.Background()); err != nil {
		t.Fatalf("shutdown: %v", err)
	}
}

// do sends a JSON request and returns the status and body.
func (e *env) do(t testing.TB, method, url, bearer string, body any) (int, []byte) {
	t.Helper()
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			t.Fatal(err)
		}
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequest(method, url, rd)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json")
	if bearer != "" {
		req.Header.Set("Authorization", "Bearer "+bearer)
	}
	resp, err := e.client.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, url, err)
	}
	defer resp.Body.Close()
	if resp.TLS == nil || resp.TLS.Version != tls.VersionTLS13 {
		t.Fatalf("%s %s: not TLS 1.3", method, url)
	}
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, b
}

// post sends a JSON request to the VM API without failing the test, for
// use from several goroutines.
func (e *env) post(path string, body any) (int, []byte, error) {
	b, err := json.Marshal(body)
	if err != nil {
		return 0, nil, err
	}
	resp, err := e.client.Post("https://"+e.svc.VMAddr()+path, "application/json", bytes.NewReader(b))
	if err != nil {
		return 0, nil, err
	}
	defer resp.Body.Close()
	out, err := io.ReadAll(resp.Body)
	return resp.StatusCode, out, err
}

func (e *env) vm(t testing.TB, method, path string, body any) (int, []byte) {
	return e.do(t, method, "https://"+e.svc.VMAddr()+path, "", body)
}

// admin calls the admin API and fails the test unless it answers want.
func (e *env) admin(t testing.TB, method, path string, body any, want int) []byte {
	t.Helper()
	code, b := e.do(t, method, "https://"+e.svc.AdminAddr()+path, e.token, body)
	if code != want {
		t.Fatalf("%s %s: %d %s, want %d", method, path, code, b, want)
	}
	return b
}

// vmTPM is the VM, played by the TPM simulator.
type vmTPM struct {
	tpm          *tpm.TPM
	ekPEM, akPEM string
	alg          tpm.Alg // of the EK and AK; ECC, the zero value, unless asMallory
	// ca is the CA of the service the VM was last set up at or asked a
	// challenge of (setup and env.challenge set it), which quote binds as
	// a VM does.
	ca [32]byte
}

// asMallory is "another TPM" for tests that need two: the simulator is one
// per process, so its RSA EK and AK stand in for a second TPM's keys (keys
// the service has never seen for this VM, with quotes only they can sign).
func (v *vmTPM) asMallory(t testing.TB) *vmTPM {
	t.Helper()
	ek, err := v.tpm.EK(tpm.RSA)
	if err != nil {
		t.Fatal(err)
	}
	ak, err := v.tpm.AK(tpm.RSA)
	if err != nil {
		t.Fatal(err)
	}
	ekPEM, _ := ek.PEM()
	akPEM, _ := ak.PEM()
	return &vmTPM{tpm: v.tpm, ekPEM: string(ekPEM), akPEM: string(akPEM), alg: tpm.RSA}
}

func openVM(t testing.TB) *vmTPM {
	t.Helper()
	tp := tpmtest.Open(t, "sim")
	ek, err := tp.EK(tpm.ECC)
	if err != nil {
		t.Fatal(err)
	}
	ak, err := tp.AK(tpm.ECC)
	if err != nil {
		t.Fatal(err)
	}
	ekPEM, _ := ek.PEM()
	akPEM, _ := ak.PEM()
	return &vmTPM{tpm: tp, ekPEM: string(ekPEM), akPEM: string(akPEM)}
}

func randomPEM(t testing.TB) string {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	p, err := tpm.MarshalPublicKeyPEM(k.Public())
	if err != nil {
		t.Fatal(err)
	}
	return string(p)
}

// pcrPolicy is a policy allowing the VM's current values of pcrs.
func (v *vmTPM) pcrPolicy(t testing.TB, pcrs ...int) map[string]any {
	t.Helper()
	got, err := v.tpm.PCRs(pcrs...)
	if err != nil {
		t.Fatal(err)
	}
	m := map[string][]string{}
	for i, val := range got.GetPcrs() {
		m[strconv.Itoa(int(i))] = []string{hex.EncodeToString(val)}
	}
	return map[string]any{"pcrs": m}
}

func discardLogger() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// challenge asks for a challenge and fails unless it is issued.
func (e *env) challenge(t testing.TB, v *vmTPM, name, volume string) api.ChallengeResponse {
	t.Helper()
	code, b := e.vm(t, "POST", "/v1/challenge", api.ChallengeRequest{VM: name, Volume: volume, EKPub: v.ekPEM, AKPub: v.akPEM})
	if code != http.StatusOK {
		t.Fatalf("challenge: %d %s", code, b)
	}
	var ch api.ChallengeResponse
	if err := json.Unmarshal(b, &ch); err != nil {
		t.Fatal(err)
	}
	v.ca = e.ca
	return ch
}

// quote makes the VM's attestation for a challenge's nonce, bound to the
// CA of the service that issued it (api.QuoteData), as bytes.
func (v *vmTPM) quote(t testing.TB, nonce []byte) []byte {
	t.Helper()
	if v.ca == [32]byte{} {
		t.Fatal("quote: the VM was neither set up nor challenged through an env, so there is no CA to bind (set v.ca)")
	}
	att, err := v.tpm.Attest(api.QuoteData(nonce, v.ca), v.alg)
	if err != nil {
		t.Fatal(err)
	}
	b, err := proto.Marshal(att)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// unlock runs challenge and unlock for the VM and returns the answer.
func (e *env) unlock(t testing.TB, v *vmTPM, name, volume string) (int, []byte) {
	t.Helper()
	ch := e.challenge(t, v, name, volume)
	return e.vm(t, "POST", "/v1/unlock", api.UnlockRequest{Challenge: ch.Challenge, Attestation: v.quote(t, ch.Nonce)})
}

// importBlob imports an unlock answer's blob into the VM's TPM.
func (v *vmTPM) importBlob(t testing.TB, body []byte, alg tpm.Alg) ([]byte, error) {
	t.Helper()
	var ur api.UnlockResponse
	if err := json.Unmarshal(body, &ur); err != nil {
		t.Fatal(err)
	}
	blob := &tpmpb.ImportBlob{}
	if err := proto.Unmarshal(ur.ImportBlob, blob); err != nil {
		t.Fatal(err)
	}
	buf, err := v.tpm.Import(blob, alg)
	if err != nil {
		return nil, err
	}
	defer buf.Destroy()
	return bytes.Clone(buf.Bytes()), nil
}

// wantRefusal checks a 403 and its reason.
func wantRefusal(t testing.TB, code int, body []byte, reason string) map[string]any {
	t.Helper()
	if code != http.StatusForbidden {
		t.Fatalf("got %d %s, want 403 %s", code, body, reason)
	}
	var m map[string]any
	if err := json.Unmarshal(body, &m); err != nil {
		t.Fatal(err)
	}
	if r, _ := m["reason"].(string); !strings.HasPrefix(r, reason) {
		t.Fatalf("reason %q, want %q (body %s)", r, reason, body)
	}
	return m
}

// startEnvFunc is startEnv with more configuration (alert delivery, admin
// client CAs) set by with.
func startEnvFunc(t testing.TB, dir string, with func(*keysvc.Config), opts ...keysvc.Option) *env {
	t.Helper()
	cfg := keysvc.Config{DataDir: dir}
	if with != nil {
		with(&cfg)
	}
	return startEnvConfig(t, cfg, opts...)
}
