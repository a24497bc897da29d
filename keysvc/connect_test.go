package keysvc_test

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/keygate/keygate/internal/pgtest"
	"github.com/keygate/keygate/keysvc"
)

// TestDatabaseDownAtStart: a replica started while its database server is
// down starts anyway: it answers /healthz, reports not ready on /readyz,
// answers the APIs 503 with Retry-After, logs the outage once, and
// connects by itself once the server starts (migrating the empty database
// then): it serves unlocks.
func TestDatabaseDownAtStart(t *testing.T) {
	pg := pgtest.New(t, pgtest.Options{})
	url := pg.NewDB(t) // empty: the replica migrates it once connected
	if err := pg.Stop("fast"); err != nil {
		t.Fatal(err)
	}
	logs := &syncBuffer{}
	e := startEnvWith(t, keysvc.Config{DataDir: t.TempDir(), DB: url, Logger: slog.New(slog.NewJSONHandler(logs, nil))})
	vmURL, adminURL := "https://"+e.svc.VMAddr(), "https://"+e.svc.AdminAddr()
	for _, c := range []struct {
		method, url string
		body        any
		want        int
	}{
		{"GET", vmURL + "/healthz", nil, http.StatusOK},
		{"GET", adminURL + "/healthz", nil, http.StatusOK},
		{"GET", vmURL + "/readyz", nil, http.StatusServiceUnavailable},
		{"GET", adminURL + "/readyz", nil, http.StatusServiceUnavailable},
		{"POST", vmURL + "/v1/challenge", map[string]string{"vm": "web-1", "volume": "web-1-vol"}, http.StatusServiceUnavailable},
		{"POST", vmURL + "/v1/unlock", map[string]string{}, http.StatusServiceUnavailable},
		{"GET", adminURL + "/v1/admin/vms", nil, http.StatusServiceUnavailable},
		{"GET", adminURL + "/metrics", nil, http.StatusServiceUnavailable},
	} {
		code, h := e.head(t, c.method, c.url, c.body)
		if code != c.want {
			t.Errorf("%s %s before the database started: %d, want %d", c.method, c.url, code, c.want)
		}
		if code == http.StatusServiceUnavailable && h.Get("Retry-After") == "" {
			t.Errorf("%s %s: 503 without Retry-After", c.method, c.url)
		}
	}
	select {
	case <-e.svc.Connected():
		t.Fatal("Connected with the database down")
	case err := <-e.svc.Err():
		t.Fatalf("the service stopped with the database down: %v", err)
	default:
	}
	// Several of its attempts fail before the server is back: logged once.
	time.Sleep(3 * time.Second)
	if err := pg.Start(); err != nil {
		t.Fatal(err)
	}
	select {
	case <-e.svc.Connected():
	case err := <-e.svc.Err():
		t.Fatalf("the service stopped when the database started: %v", err)
	case <-time.After(60 * time.Second):
		t.Fatal("not connected 60 s after the database started")
	}
	waitFor(t, "/readyz to say ready", func() bool { code, _ := e.head(t, "GET", adminURL+"/readyz", nil); return code == http.StatusOK })
	v := openVM(t)
	vol := setup(t, e, v, "web-1")
	if code, body := e.unlock(t, v, "web-1", vol); code != http.StatusOK {
		t.Fatalf("unlock once connected: %d %s", code, body)
	}
	for msg, want := range map[string]int{`"msg":"database unavailable at start`: 1, `"msg":"database available: serving"`: 1, `"msg":"database unavailable:`: 0} {
		if n := strings.Count(logs.String(), msg); n != want {
			t.Errorf("%s logged %d times, want %d", msg, n, want)
		}
	}
}

// TestDatabaseDownAtStartOtherMasterKey: a replica that waited for its
// database and then finds it records another master key stops with the
// error a start against a running database gives, and never serves.
func TestDatabaseDownAtStartOtherMasterKey(t *testing.T) {
	pg := pgtest.New(t, pgtest.Options{})
	url := pg.NewDB(t)
	first := startEnvWith(t, keysvc.Config{DataDir: t.TempDir(), DB: url}) // records its master key
	first.stop(t)
	if err := pg.Stop("fast"); err != nil {
		t.Fatal(err)
	}
	e := startEnvWith(t, keysvc.Config{DataDir: t.TempDir(), DB: url}) // a master key of its own
	if err := pg.Start(); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-e.svc.Err():
		if !errors.Is(err, keysvc.ErrMasterKeyMismatch) || !strings.Contains(err.Error(), "start every replica from a copy of the first replica's data directory") {
			t.Fatalf("stopped with %v; want ErrMasterKeyMismatch saying what to do", err)
		}
	case <-e.svc.Connected():
		t.Fatal("connected to a database that records another master key")
	case <-time.After(60 * time.Second):
		t.Fatal("no error 60 s after the database started")
	}
	if code, _ := e.head(t, "GET", "https://"+e.svc.AdminAddr()+"/readyz", nil); code != http.StatusServiceUnavailable {
		t.Errorf("/readyz after the mismatch: %d, want 503", code)
	}
	if err := e.svc.Shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}
}

// head sends a request (with the admin token, which the VM API ignores)
// and returns its status and headers.
func (e *env) head(t *testing.T, method, url string, body any) (int, http.Header) {
	t.Helper()
	req, err := http.NewRequest(method, url, bytes.NewReader(mustJSON(t, body)))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer "+e.token)
	resp, err := e.client.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, url, err)
	}
	resp.Body.Close()
	return resp.StatusCode, resp.Header
}
