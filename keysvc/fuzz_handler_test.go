package keysvc_test

import (
	"bytes"
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/keygate/keygate/keysvc"
	"github.com/keygate/keygate/keysvc/api"
	"github.com/keygate/keygate/keysvc/audit"
	"github.com/keygate/keygate/keysvc/masterkey"
	"github.com/keygate/keygate/keysvc/store"
)

// fuzzToken is the admin token of newFuzzServer's service.
const fuzzToken = "0123456789abcdef0123456789abcdef"

// newFuzzServer is a key service over an in-memory store and audit log:
// under -fuzz every package is coverage-instrumented, and the transpiled
// SQLite becomes too slow to fuzz through.
func newFuzzServer(f *testing.F) *keysvc.Server {
	mk, _, err := masterkey.LoadOrCreate(filepath.Join(f.TempDir(), "master.key"))
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(mk.Destroy)
	srv, err := keysvc.New(keysvc.WithStore(newMemStore()), keysvc.WithAudit(&memAudit{}), keysvc.WithMasterKey(mk),
		keysvc.WithAdminToken(fuzzToken), keysvc.WithLogger(discardLogger()), keysvc.WithRateLimits(0, 0), keysvc.WithCA([32]byte{1}))
	if err != nil {
		f.Fatal(err)
	}
	return srv
}

// FuzzVMAPI posts outside bytes to every VM API endpoint of a service with
// an enrolled VM and a volume. Seeds include a genuine challenge with a
// garbage attestation, so that the fuzzer reaches the attestation decoding
// and verification behind the token check. No input may panic, answer 200,
// or answer a status outside the protocol's list.
func FuzzVMAPI(f *testing.F) {
	srv := newFuzzServer(f)
	ek, ak := randomPEM(f), randomPEM(f)
	admin := srv.AdminHandler()
	for _, req := range []struct {
		path string
		body any
	}{
		{"/v1/admin/vms", api.EnrollRequest{Name: "vm", EKPub: ek, AKPub: ak}},
		{"/v1/admin/volumes", api.VolumeRequest{ID: "vol", VM: "vm"}},
	} {
		b, _ := json.Marshal(req.body)
		r := httptest.NewRequest("POST", req.path, bytes.NewReader(b))
		r.Header.Set("Authorization", "Bearer "+fuzzToken)
		w := httptest.NewRecorder()
		admin.ServeHTTP(w, r)
		if w.Code != http.StatusCreated {
			f.Fatalf("%s: %d %s", req.path, w.Code, w.Body)
		}
	}
	vmAPI := srv.VMHandler()
	post := func(path string, body []byte) *httptest.ResponseRecorder {
		r := httptest.NewRequest("POST", path, bytes.NewReader(body))
		w := httptest.NewRecorder()
		vmAPI.ServeHTTP(w, r)
		return w
	}
	chReq, _ := json.Marshal(api.ChallengeRequest{VM: "vm", Volume: "vol", EKPub: ek, AKPub: ak})
	var ch api.ChallengeResponse
	if w := post("/v1/challenge", chReq); w.Code != http.StatusOK || json.Unmarshal(w.Body.Bytes(), &ch) != nil {
		f.Fatalf("challenge: %d %s", w.Code, w.Body)
	}
	for _, att := range [][]byte{nil, {0x0a, 0x02, 0x08, 0x01}, []byte("\x12\x00\x1a\x04quot"), bytes.Repeat([]byte{0xff}, 64)} {
		b, _ := json.Marshal(api.UnlockRequest{Challenge: ch.Challenge, Attestation: att})
		f.Add(uint8(1), b)
	}
	f.Add(uint8(0), chReq)
	f.Add(uint8(2), []byte(`{"session":"s1.e30.AA","events":[{"kind":"x","severity":"info"}]}`))
	f.Add(uint8(1), []byte(`{"challenge":"v1.AAAA.AAAA","attestation":""}`))
	f.Add(uint8(4), []byte(`{"vm":"vm","ek_pub":"","ak_public":"AAEAAQ=="}`))
	f.Add(uint8(5), []byte(`{"activation":"a1.e30.AA","secret":"AAAA"}`))
	f.Add(uint8(6), []byte(`{"proof":"AAAA"}`))
	f.Add(uint8(8), []byte(`{"challenge":"v1.AAAA.AAAA","attestation":"","interval_seconds":300}`))
	paths := []string{"/v1/challenge", "/v1/unlock", "/v1/events", "/v1/provision", "/v1/activate", "/v1/activate/finish",
		"/v1/rotate", "/v1/reattest/challenge", "/v1/reattest"}
	allowed := map[int]bool{400: true, 401: true, 403: true, 413: true}
	f.Fuzz(func(t *testing.T, which uint8, body []byte) {
		w := post(paths[int(which)%len(paths)], body)
		ok := allowed[w.Code] || (w.Code == http.StatusOK && int(which)%len(paths) == 0) // a challenge may be issued
		if !ok {
			t.Fatalf("%s answered %d %s", paths[int(which)%len(paths)], w.Code, w.Body)
		}
	})
}

// memStore is an in-memory keysvc.Store.
type memStore struct {
	mu   sync.Mutex
	vms  map[string]store.VM
	vols map[string]store.Volume
	used map[string]bool
	evs  []store.VMEvent
}

func newMemStore() *memStore {
	return &memStore{vms: map[string]store.VM{}, vols: map[string]store.Volume{}, used: map[string]bool{}}
}

func (m *memStore) CreateVM(_ context.Context, vm store.VM) (store.VM, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if _, ok := m.vms[vm.Name]; ok {
		return vm, store.ErrExists
	}
	m.vms[vm.Name] = vm
	return vm, nil
}

func (m *memStore) GetVM(_ context.Context, name string) (store.VM, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	vm, ok := m.vms[name]
	if !ok {
		return vm, store.ErrNotFound
	}
	return vm, nil
}

func (m *memStore) UpdateVM(_ context.Context, name string, fn func(*store.VM) error) (store.VM, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	vm, ok := m.vms[name]
	if !ok {
		return vm, store.ErrNotFound
	}
	if err := fn(&vm); err != nil {
		return vm, err
	}
	m.vms[name] = vm
	return vm, nil
}

func (m *memStore) ListVMs(context.Context) ([]store.VM, error) { return nil, nil }

func (m *memStore) CreateVolume(_ context.Context, v store.Volume) (store.Volume, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if _, ok := m.vms[v.VM]; !ok {
		return v, store.ErrNotFound
	}
	m.vols[v.ID] = v
	return v, nil
}

func (m *memStore) GetVolume(_ context.Context, id string) (store.Volume, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	v, ok := m.vols[id]
	if !ok {
		return v, store.ErrNotFound
	}
	return v, nil
}

func (m *memStore) UpdateVolume(_ context.Context, id string, fn func(*store.Volume) error) (store.Volume, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	v, ok := m.vols[id]
	if !ok {
		return v, store.ErrNotFound
	}
	if err := fn(&v); err != nil {
		return v, err
	}
	m.vols[id] = v
	return v, nil
}

func (m *memStore) ListVolumes(context.Context, string) ([]store.Volume, error) { return nil, nil }

func (m *memStore) UseChallenge(_ context.Context, id string, _ time.Time) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.used[id] {
		return store.ErrChallengeUsed
	}
	m.used[id] = true
	return nil
}

// ChallengeUsed sees only UseChallenge's uses: memAudit keeps those of
// AppendUsing, so a replay gets past this early check and is refused there.
func (m *memStore) ChallengeUsed(_ context.Context, id string) (bool, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.used[id], nil
}

func (m *memStore) PurgeChallenges(context.Context, time.Time) (int64, error) { return 0, nil }

func (m *memStore) AddEvents(_ context.Context, evs []store.VMEvent) ([]store.VMEvent, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := slices.Clone(evs)
	for i := range out {
		out[i].ID = int64(len(m.evs) + 1)
		m.evs = append(m.evs, out[i])
	}
	return out, nil
}

func (m *memStore) ListEvents(context.Context, store.EventFilter) ([]store.VMEvent, error) {
	return nil, nil
}

func (m *memStore) PurgeEvents(context.Context, time.Time) (int64, error) { return 0, nil }

// memAudit is an in-memory keysvc.Auditor.
type memAudit struct {
	mu   sync.Mutex
	recs []audit.Record
	used map[string]bool
}

func (a *memAudit) Append(_ context.Context, ev audit.Event) (audit.Record, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.appendLocked(ev)
}

func (a *memAudit) AppendUsing(_ context.Context, use store.ChallengeUse, ev audit.Event) (audit.Record, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.used[use.ID] {
		return audit.Record{}, store.ErrChallengeUsed
	}
	r, err := a.appendLocked(ev)
	if err == nil {
		if a.used == nil {
			a.used = map[string]bool{}
		}
		a.used[use.ID] = true
	}
	return r, err
}

func (a *memAudit) appendLocked(ev audit.Event) (audit.Record, error) {
	d, err := json.Marshal(ev.Details)
	if err != nil {
		return audit.Record{}, err
	}
	r := audit.Record{Seq: uint64(len(a.recs) + 1), Actor: ev.Actor, Action: ev.Action, Subject: ev.Subject, Details: d}
	a.recs = append(a.recs, r)
	return r, nil
}

func (a *memAudit) Verify(context.Context) (audit.Report, error) { return audit.Report{}, nil }

func (a *memAudit) Scan(_ context.Context, from uint64, fn func(audit.Record) error) error {
	a.mu.Lock()
	recs := append([]audit.Record(nil), a.recs...)
	a.mu.Unlock()
	for _, r := range recs {
		if r.Seq >= from {
			if err := fn(r); err != nil {
				return err
			}
		}
	}
	return nil
}
