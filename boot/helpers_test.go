package boot

import (
	"context"
	"encoding/hex"
	"errors"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/keygate/keygate/disk/ninep"
	"github.com/keygate/keygate/internal/testutil"
	"github.com/keygate/keygate/internal/tpmtest"
	"github.com/keygate/keygate/keysvc/api"
	"github.com/keygate/keygate/keysvc/client"

	"github.com/hugelgupf/p9/p9"

	"github.com/keygate/keygate/disk"
	"github.com/keygate/keygate/keysvc"
	"github.com/keygate/keygate/tpm"
)

// env is a real key service on loopback over TLS 1.3, in a temporary
// data directory, that a test can stop and start again on the same ports.
type env struct {
	dir, vmAddr, adminAddr string
	svc                    *keysvc.Service
	ca                     []byte
	token                  string
	adm                    *client.Client // the admin API
	opts                   []keysvc.Option
}

func quietLog() *slog.Logger { return slog.New(slog.DiscardHandler) }

func startEnv(t testing.TB, opts ...keysvc.Option) *env {
	t.Helper()
	e := &env{dir: t.TempDir(), vmAddr: "127.0.0.1:0", adminAddr: "127.0.0.1:0", opts: opts}
	e.start(t)
	t.Cleanup(func() { e.stop(t) })
	var err error
	if e.ca, err = os.ReadFile(filepath.Join(e.dir, keysvc.CAFile)); err != nil {
		t.Fatal(err)
	}
	tok, err := os.ReadFile(filepath.Join(e.dir, keysvc.AdminTokenFile))
	if err != nil {
		t.Fatal(err)
	}
	e.token = strings.TrimSpace(string(tok))
	if e.adm, err = client.New(client.Config{URLs: []string{"https://" + e.adminAddr}, CA: e.ca, Token: e.token}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(e.adm.Close)
	return e
}

func (e *env) start(t testing.TB) {
	t.Helper()
	var err error
	e.svc, err = keysvc.Start(context.Background(), keysvc.Config{DataDir: e.dir, Listen: e.vmAddr, AdminListen: e.adminAddr, Logger: quietLog(), Options: e.opts})
	if err != nil {
		t.Fatalf("start keysvc: %v", err)
	}
	e.vmAddr, e.adminAddr = e.svc.VMAddr(), e.svc.AdminAddr()
}

func (e *env) stop(t testing.TB) {
	if e.svc != nil {
		if err := e.svc.Shutdown(context.Background()); err != nil {
			t.Errorf("stop keysvc: %v", err)
		}
		e.svc = nil
	}
}

func (e *env) url() string { return "https://" + e.vmAddr }

// admin calls the admin API and fails the test unless it answers want (a
// 2xx want takes any success).
func (e *env) admin(t testing.TB, method, path string, body any, want int) []byte {
	t.Helper()
	var b []byte
	err := e.adm.Do(context.Background(), method, path, "", body, &b)
	var se *client.Error
	switch {
	case err == nil && want/100 == 2:
	case errors.As(err, &se) && se.StatusCode == want:
	default:
		t.Fatalf("%s %s: %v, want %d", method, path, err, want)
	}
	return b
}

// openSim opens the in-process TPM simulator (one per process at a time)
// and checks at the end that nothing was left loaded in it.
func openSim(t testing.TB) *tpm.TPM {
	t.Helper()
	return tpmtest.Open(t, "sim")
}

// policyPCRs are the PCRs the tests' policies name: two boot PCRs and the
// window PCR, which is what makes a second unlock in one boot fail.
var policyPCRs = []int{0, 7, tpm.WindowPCR}

// enroll enrolls tp as VM name, with a policy allowing tp's current values
// of policyPCRs.
func (e *env) enroll(t testing.TB, tp *tpm.TPM, name string, provisioning bool) {
	t.Helper()
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
	e.admin(t, "POST", "/v1/admin/vms", api.EnrollRequest{Name: name, EKPub: string(ekPEM), AKPub: string(akPEM), ProvisioningAllowed: provisioning}, http.StatusCreated)
	got, err := tp.PCRs(policyPCRs...)
	if err != nil {
		t.Fatal(err)
	}
	m := map[string][]string{}
	for i, v := range got.GetPcrs() {
		m[strconv.Itoa(int(i))] = []string{hex.EncodeToString(v)}
	}
	e.admin(t, "PUT", "/v1/admin/vms/"+name+"/policy", map[string]any{"pcrs": m}, http.StatusOK)
}

// volume makes a keygate image for VM vm, registered at the key service,
// the way `keygate disk create --keysvc` does.
func (e *env) volume(t testing.TB, vm, id string) string {
	t.Helper()
	img := filepath.Join(t.TempDir(), id+".img")
	res, err := CreateVolume(context.Background(), CreateConfig{Image: img, KeysvcURL: e.url(), AdminURL: "https://" + e.adminAddr,
		CA: e.ca, Token: e.token, VM: vm, Volume: id, Options: disk.CreateOptions{Size: 64 << 20, FS: disk.Ext4}})
	if err != nil {
		t.Fatalf("create volume: %v", err)
	}
	res.Wipe()
	return img
}

// events records what a Boot reports, for tests to wait on.
type events struct {
	mu   sync.Mutex
	seen []Event
	ch   chan Event
}

func newEvents() *events { return &events{ch: make(chan Event, 256)} }

func (ev *events) on(e Event) {
	ev.mu.Lock()
	ev.seen = append(ev.seen, e)
	ev.mu.Unlock()
	select {
	case ev.ch <- e:
	default:
	}
}

// wait returns the next event of kind k, failing after a generous bound
// (a hang, not a performance threshold).
func (ev *events) wait(t testing.TB, k EventKind) Event {
	t.Helper()
	timeout := time.After(60 * time.Second)
	for {
		select {
		case e := <-ev.ch:
			if e.Kind == k {
				return e
			}
		case <-timeout:
			t.Fatalf("no %q event within 60s; saw %v", k, ev.kinds())
		}
	}
}

func (ev *events) kinds() []EventKind {
	ev.mu.Lock()
	defer ev.mu.Unlock()
	var k []EventKind
	for _, e := range ev.seen {
		k = append(k, e.Kind)
	}
	return k
}

// p9Client attaches to a 9P server on a unix socket.
func p9Client(t testing.TB, sock string) (p9.File, func()) {
	t.Helper()
	root, hangup, err := ninep.Dial(sock)
	if err != nil {
		t.Fatal(err)
	}
	return root, func() { hangup() }
}

// socketPath returns a path for a unix socket in a fresh directory that is
// removed when the test ends (testutil.ShortTempDir: socket paths are
// limited to 108 bytes).
func socketPath(t testing.TB) string {
	t.Helper()
	return filepath.Join(testutil.ShortTempDir(t), "9p")
}
