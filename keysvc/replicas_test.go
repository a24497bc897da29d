package keysvc_test

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/keygate/keygate/internal/pgtest"
	"github.com/keygate/keygate/keysvc"
	"github.com/keygate/keygate/keysvc/api"
	"github.com/keygate/keygate/keysvc/masterkey"
	"github.com/keygate/keygate/tpm"
)

// One PostgreSQL server for the package's tests (tests that stop their
// server make their own with pgtest.New). With childEnv set, the binary is
// a replica in a process of its own instead (startChild).
func TestMain(m *testing.M) {
	if spec := os.Getenv(childEnv); spec != "" {
		os.Exit(runChild(spec))
	}
	os.Exit(pgtest.Main(m))
}

// replicaDir copies a data directory as an operator making a replica would:
// master key, CA and its key, admin token (and the first replica's server
// certificate, which the replica reissues for its own --hostname).
func replicaDir(t testing.TB, from string) string {
	t.Helper()
	to := t.TempDir()
	for _, name := range []string{keysvc.MasterKeyFile, keysvc.CAFile, "ca.key", keysvc.AdminTokenFile, "server.pem", "server.key"} {
		b, err := os.ReadFile(filepath.Join(from, name))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(to, name), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return to
}

// serverNames dials addr and returns the DNS names of the certificate it
// serves, checked against the CA in dir.
func serverNames(t testing.TB, e *env, addr string) []string {
	t.Helper()
	tr := e.client.Transport.(*http.Transport)
	conn, err := tls.Dial("tcp", addr, tr.TLSClientConfig.Clone())
	if err != nil {
		t.Fatalf("TLS to %s with the shared CA: %v", addr, err)
	}
	defer conn.Close()
	return conn.ConnectionState().PeerCertificates[0].DNSNames
}

// TestReplicas: two key services from one data directory (copied) on one
// PostgreSQL database are one service: a challenge issued by one is
// redeemed at the other, a challenge redeemed at both at once releases
// once, and each serves its own certificate from the shared CA.
func TestReplicas(t *testing.T) {
	url := pgtest.Shared(t).NewDB(t)
	a := startEnvWith(t, keysvc.Config{DataDir: t.TempDir(), DB: url})
	v := openVM(t)
	vol := setup(t, a, v, "web-1")
	b := startEnvWith(t, keysvc.Config{DataDir: replicaDir(t, a.dir), DB: url, Hostnames: []string{"replica-b.example"}})

	t.Run("challenge from one, unlock at the other", func(t *testing.T) {
		ch := a.challenge(t, v, "web-1", vol)
		code, body := b.vm(t, "POST", "/v1/unlock", api.UnlockRequest{Challenge: ch.Challenge, Attestation: v.quote(t, ch.Nonce)})
		if code != http.StatusOK {
			t.Fatalf("unlock at b with a's challenge: %d %s", code, body)
		}
		uk, err := v.importBlob(t, body, tpm.ECC)
		if err != nil || !bytes.Equal(uk, ukBytes) {
			t.Fatalf("import b's blob: %v", err)
		}
		code, body = a.vm(t, "POST", "/v1/unlock", api.UnlockRequest{Challenge: ch.Challenge, Attestation: v.quote(t, ch.Nonce)})
		wantRefusal(t, code, body, api.ReasonChallenge)
	})

	t.Run("redeemed at both at once releases once", func(t *testing.T) {
		const n = 8
		reqs := make([]api.UnlockRequest, n)
		for i := range reqs {
			ch := b.challenge(t, v, "web-1", vol)
			reqs[i] = api.UnlockRequest{Challenge: ch.Challenge, Attestation: v.quote(t, ch.Nonce)}
		}
		var (
			wg       sync.WaitGroup
			released [n]atomic.Int32
		)
		for i := range reqs {
			for _, e := range []*env{a, b} {
				wg.Go(func() {
					code, body, err := e.post("/v1/unlock", reqs[i])
					switch {
					case err != nil:
						t.Error(err)
					case code == http.StatusOK:
						released[i].Add(1)
					case code != http.StatusForbidden || !strings.Contains(string(body), api.ReasonChallenge):
						t.Errorf("unlock %d: %d %s", i, code, body)
					}
				})
			}
		}
		wg.Wait()
		for i := range released {
			if got := released[i].Load(); got != 1 {
				t.Errorf("challenge %d redeemed at both replicas: released %d times, want once", i, got)
			}
		}
	})

	t.Run("each replica its own certificate from the shared CA", func(t *testing.T) {
		an, bn := serverNames(t, a, a.svc.VMAddr()), serverNames(t, a, b.svc.VMAddr())
		if !slices.Contains(bn, "replica-b.example") || slices.Contains(an, "replica-b.example") {
			t.Errorf("a serves %v, b serves %v: want b's --hostname in b's certificate only", an, bn)
		}
	})

	t.Run("health", func(t *testing.T) {
		for _, e := range []*env{a, b} {
			for _, addr := range []string{e.svc.VMAddr(), e.svc.AdminAddr()} {
				for _, path := range []string{"/healthz", "/readyz"} {
					if code, body := e.do(t, "GET", "https://"+addr+path, "", nil); code != http.StatusOK {
						t.Errorf("GET %s%s: %d %s", addr, path, code, body)
					}
				}
			}
		}
	})

	t.Run("audit chain verifies at both", func(t *testing.T) {
		for _, e := range []*env{a, b} {
			body := e.admin(t, "GET", "/v1/admin/audit/verify", nil, http.StatusOK)
			if !bytes.Contains(body, []byte(`"ok":true`)) {
				t.Errorf("audit verify: %s", body)
			}
		}
	})
}

// TestDatabaseOutage: with its PostgreSQL server stopped under it, a
// replica answers VM requests with 503 and Retry-After (within the VM's
// timeout, never a hang), reports not ready, logs the outage once, and
// recovers by itself when the server is back.
func TestDatabaseOutage(t *testing.T) {
	pg := pgtest.New(t, pgtest.Options{})
	logs := &syncBuffer{}
	e := startEnvWith(t, keysvc.Config{DataDir: t.TempDir(), DB: pg.NewDB(t), Logger: slog.New(slog.NewJSONHandler(logs, nil))})
	v := openVM(t)
	vol := setup(t, e, v, "web-1")
	if code, body := e.unlock(t, v, "web-1", vol); code != http.StatusOK {
		t.Fatalf("unlock before the outage: %d %s", code, body)
	}
	ready := func() int {
		code, _ := e.do(t, "GET", "https://"+e.svc.AdminAddr()+"/readyz", "", nil)
		return code
	}
	ch := e.challenge(t, v, "web-1", vol)
	req := api.UnlockRequest{Challenge: ch.Challenge, Attestation: v.quote(t, ch.Nonce)}

	if err := pg.Stop("immediate"); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "/readyz to say not ready", func() bool { return ready() == http.StatusServiceUnavailable })
	for range 5 {
		// e.client has the VM's 30 s timeout: a hang fails here.
		resp, err := e.client.Post("https://"+e.svc.VMAddr()+"/v1/unlock", "application/json", bytes.NewReader(mustJSON(t, req)))
		if err != nil {
			t.Fatalf("unlock during the outage: %v", err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusServiceUnavailable || resp.Header.Get("Retry-After") == "" {
			t.Fatalf("unlock during the outage: %d, Retry-After %q; want 503 with Retry-After", resp.StatusCode, resp.Header.Get("Retry-After"))
		}
	}
	if code, _ := e.do(t, "GET", "https://"+e.svc.VMAddr()+"/healthz", "", nil); code != http.StatusOK {
		t.Errorf("/healthz during the outage: %d, want 200 (the process is alive)", code)
	}

	if err := pg.Start(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "/readyz to say ready again", func() bool { return ready() == http.StatusOK })
	// The challenge issued before the outage was never used: it unlocks now.
	code, body := e.vm(t, "POST", "/v1/unlock", req)
	if code != http.StatusOK {
		t.Fatalf("unlock after the outage: %d %s", code, body)
	}
	if n := strings.Count(logs.String(), `"msg":"database unavailable`); n != 1 {
		t.Errorf("the outage was logged %d times, want once", n)
	}
	if n := strings.Count(logs.String(), `"msg":"database available again`); n != 1 {
		t.Errorf("the recovery was logged %d times, want once", n)
	}
}

func mustJSON(t testing.TB, v any) []byte {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// mustJSONNoT encodes a request body that always encodes (a test's own
// request types).
func mustJSONNoT(v any) []byte {
	b, err := json.Marshal(v)
	if err != nil {
		panic(err)
	}
	return b
}

// TestReplicasStartTogether: replicas started at once on a new database
// migrate it once, record the master key once, and adopt the store once:
// both start, and the chain holds one genesis record.
func TestReplicasStartTogether(t *testing.T) {
	url := pgtest.Shared(t).NewDB(t)
	first := t.TempDir()
	if _, err := keysvc.Bootstrap(first, nil, time.Now()); err != nil {
		t.Fatal(err)
	}
	mk, _, err := masterkey.LoadOrCreate(filepath.Join(first, keysvc.MasterKeyFile))
	if err != nil {
		t.Fatal(err)
	}
	mk.Destroy()
	dirs := []string{first, replicaDir(t, first)}
	errs := make([]error, len(dirs))
	var wg sync.WaitGroup
	for i, d := range dirs {
		wg.Go(func() {
			svc, err := keysvc.Start(context.Background(), keysvc.Config{DataDir: d, DB: url, Listen: "127.0.0.1:0", AdminListen: "127.0.0.1:0", Logger: discardLogger()})
			if err == nil {
				svc.Shutdown(context.Background())
			}
			errs[i] = err
		})
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("replica %d started together with another: %v", i, err)
		}
	}
	e := startEnvWith(t, keysvc.Config{DataDir: first, DB: url})
	body := e.admin(t, "GET", "/v1/admin/audit?from=1", nil, http.StatusOK)
	if n := strings.Count(string(body), `"Action":"genesis"`); n != 1 {
		t.Fatalf("%d genesis records after two replicas started together, want 1: %s", n, body)
	}
}
