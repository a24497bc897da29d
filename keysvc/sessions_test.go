package keysvc_test

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"database/sql"
	"encoding/base64"
	"encoding/json"
	"net/http"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/keygate/keygate/internal/pgtest"
	"github.com/keygate/keygate/keysvc"
	"github.com/keygate/keygate/keysvc/api"
	"github.com/keygate/keygate/keysvc/masterkey"
	"github.com/keygate/keygate/keysvc/store"
)

// heartbeat posts one heartbeat (or, with severity warning, one monitor
// event) over the session and returns the status and the state answered.
func (e *env) heartbeat(t *testing.T, session, severity string) (int, string) {
	t.Helper()
	kind := api.KindHeartbeat
	if severity != "info" {
		kind = "mem-read"
	}
	code, b := e.vm(t, "POST", "/v1/events", api.EventsRequest{Session: session, Events: []api.Event{{Kind: kind, Severity: severity}}})
	var r api.EventsResponse
	json.Unmarshal(b, &r)
	return code, r.State
}

// TestSessionsSurviveRotation: a session issued before a master-key
// rotation still heartbeats, reports events and re-attests after the
// rotation and a restart of keysvc (the session key is sealed in the store
// and re-sealed by the rotation, not replaced); forged tokens, among them
// one MAC'd under the key the new master key would derive, get 401.
func TestSessionsSurviveRotation(t *testing.T) {
	t.Run("sqlite", func(t *testing.T) { testSessionsSurviveRotation(t, "") })
	t.Run("postgres", func(t *testing.T) { testSessionsSurviveRotation(t, pgtest.Shared(t).NewDB(t)) })
}

func testSessionsSurviveRotation(t *testing.T, db string) {
	dir := t.TempDir()
	e := startEnvWith(t, keysvc.Config{DataDir: dir, DB: db})
	v := openVM(t)
	if err := v.tpm.Reboot(); err != nil {
		t.Fatal(err)
	}
	vol := setup(t, e, v, "keep")
	session := e.servingVM(t, v, "keep", vol)
	e.admin(t, "POST", "/v1/admin/master-key/rotate", nil, http.StatusAccepted)
	if msg := e.waitRotation(t); msg != "" {
		t.Fatalf("rotation stopped: %s", msg)
	}
	e.stop(t)
	e = startEnvWith(t, keysvc.Config{DataDir: dir, DB: db})

	if code, state := e.heartbeat(t, session, "info"); code != http.StatusOK || state != api.StateActive {
		t.Fatalf("heartbeat after rotation and restart: %d %q, want 200 active", code, state)
	}
	if code, state := e.heartbeat(t, session, "warning"); code != http.StatusOK || state != api.StateActive {
		t.Fatalf("event after rotation and restart: %d %q, want 200 active", code, state)
	}
	if code, rr, b := e.reattest(t, v, session, 60); code != http.StatusOK || rr.State != api.StateActive {
		t.Fatalf("re-attestation after rotation and restart: %d %s", code, b)
	}

	// Forged tokens: the payload changed, the MAC changed, and a MAC under
	// the session key the new master key derives (what keysvc used before
	// the key was stored; it would take this token and refuse the real one).
	payload, mac, _ := strings.Cut(strings.TrimPrefix(session, "s1."), ".")
	raw, _ := base64.RawURLEncoding.DecodeString(payload)
	var claims map[string]any
	json.Unmarshal(raw, &claims)
	claims["volume"] = "other-vol"
	other, _ := json.Marshal(claims)
	flipped := []byte(mac)
	flipped[3] ^= 1
	mk, _, err := masterkey.LoadOrCreate(filepath.Join(dir, keysvc.MasterKeyFile))
	if err != nil {
		t.Fatal(err)
	}
	derived, err := mk.Derive("keygate session mac v1")
	if err != nil {
		t.Fatal(err)
	}
	h := hmac.New(sha256.New, derived.Bytes())
	h.Write(raw)
	underNew := "s1." + payload + "." + base64.RawURLEncoding.EncodeToString(h.Sum(nil))
	derived.Destroy()
	mk.Destroy()
	for name, tok := range map[string]string{
		"payload-edited":   "s1." + base64.RawURLEncoding.EncodeToString(other) + "." + mac,
		"mac-flipped":      "s1." + payload + "." + string(flipped),
		"mac-under-new-mk": underNew,
		"no-prefix":        strings.TrimPrefix(session, "s1."),
	} {
		t.Run(name, func(t *testing.T) {
			if code, _ := e.heartbeat(t, tok, "info"); code != http.StatusUnauthorized {
				t.Fatalf("heartbeat with a forged token: %d, want 401", code)
			}
			if code, _ := e.do(t, "POST", "https://"+e.svc.VMAddr()+"/v1/reattest/challenge", tok, nil); code != http.StatusUnauthorized {
				t.Fatalf("re-attestation challenge with a forged token: %d, want 401", code)
			}
		})
	}

	// The session still ends the ordinary way.
	e.admin(t, "POST", "/v1/admin/vms/keep/revoke", nil, http.StatusOK)
	if code, state := e.heartbeat(t, session, "info"); code != http.StatusOK || state != api.StateRevoked {
		t.Fatalf("heartbeat after revoke: %d %q, want revoked", code, state)
	}
}

// TestSessionStateAcrossReplicas: two replicas on one PostgreSQL database
// share re-attestation state. A lock decided at A makes the heartbeat at B
// read revoked and B's re-attestation answer lock, also after B restarts; a
// lock row edited to unlocked reads as locked; a deleted one is restored
// from the audit chain's lock record; a stale session is flagged
// once when both replicas sweep at once, and unflagged at both when it
// re-attests at either.
func TestSessionStateAcrossReplicas(t *testing.T) {
	url := pgtest.Shared(t).NewDB(t)
	a := startEnvWith(t, keysvc.Config{DataDir: t.TempDir(), DB: url})
	bDir := replicaDir(t, a.dir)
	b := startEnvWith(t, keysvc.Config{DataDir: bDir, DB: url})

	v := openVM(t)
	if err := v.tpm.Reboot(); err != nil {
		t.Fatal(err)
	}
	vol := setup(t, a, v, "web-1")
	session := a.servingVM(t, v, "web-1", vol)
	if code, rr, body := b.reattest(t, v, session, 60); code != http.StatusOK || rr.State != api.StateActive {
		t.Fatalf("re-attestation at b: %d %s", code, body)
	}
	v.tpm.Extend(7, []byte("a runtime measurement"))
	if _, rr, body := a.reattest(t, v, session, 60); rr.State != api.StateLock {
		t.Fatalf("re-attestation at a: %s, want lock", body)
	}
	if code, state := b.heartbeat(t, session, "info"); code != http.StatusOK || state != api.StateRevoked {
		t.Fatalf("heartbeat at b after a lock at a: %d %q, want revoked", code, state)
	}
	code, body := b.do(t, "POST", "https://"+b.svc.VMAddr()+"/v1/reattest/challenge", session, nil)
	var rr api.ReattestResponse
	json.Unmarshal(body, &rr)
	if code != http.StatusOK || rr.State != api.StateLock {
		t.Fatalf("re-attestation challenge at b after a lock at a: %d %s, want lock", code, body)
	}
	b.stop(t)
	b = startEnvWith(t, keysvc.Config{DataDir: bDir, DB: url})
	if code, state := b.heartbeat(t, session, "info"); code != http.StatusOK || state != api.StateRevoked {
		t.Fatalf("heartbeat at b after its restart: %d %q, want revoked", code, state)
	}

	// A database writer edits the lock away: the row no longer carries its
	// MAC, and reads as locked at a replica that never saw the lock.
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, url)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	if tag, err := conn.Exec(ctx, `UPDATE reattest_sessions SET locked_ns = 0 WHERE id IN (SELECT id FROM reattest_sessions WHERE locked_ns != 0)`); err != nil || tag.RowsAffected() != 1 {
		t.Fatalf("edit the lock: %v %v", tag, err)
	}
	b.stop(t)
	b = startEnvWith(t, keysvc.Config{DataDir: bDir, DB: url})
	if code, state := b.heartbeat(t, session, "info"); code != http.StatusOK || state != api.StateRevoked {
		t.Fatalf("heartbeat at b after the lock was edited away: %d %q, want revoked", code, state)
	}

	// A database writer deletes the lock (or replays the session's row from
	// before it): the MAC cannot tell, but the lock record in the audit
	// chain does. Each replica's sweep (and its start) restores the lock
	// and raises a critical store-tampered event.
	if tag, err := conn.Exec(ctx, `DELETE FROM reattest_sessions`); err != nil || tag.RowsAffected() != 1 {
		t.Fatalf("delete the lock: %v %v", tag, err)
	}
	b.stop(t)
	b = startEnvWith(t, keysvc.Config{DataDir: bDir, DB: url})
	b.svc.Server.CheckStale(t.Context())
	if code, state := b.heartbeat(t, session, "info"); code != http.StatusOK || state != api.StateRevoked {
		t.Fatalf("heartbeat at b after the lock was deleted: %d %q, want revoked", code, state)
	}
	var locked int64
	if err := conn.QueryRow(ctx, `SELECT locked_ns FROM reattest_sessions`).Scan(&locked); err != nil || locked == 0 {
		t.Fatalf("lock row after the sweep: %d %v, want it restored", locked, err)
	}
	if evs := b.listEvents(t, "kind=store-tampered"); len(evs) == 0 || evs[0].SessionID != sessionID(t, mustJSON(t, api.UnlockResponse{Session: session})) {
		t.Fatalf("store-tampered events %+v, want the session's", evs)
	}

	// Staleness, judged once for the fleet.
	// The same VM, rebooted, with a new session (one simulator per process).
	w := v
	if err := w.tpm.Reboot(); err != nil {
		t.Fatal(err)
	}
	s2 := b.servingVM(t, w, "web-1", vol)
	if code, rr, body := b.reattest(t, w, s2, 10); code != http.StatusOK || rr.State != api.StateActive {
		t.Fatalf("re-attestation at b: %d %s", code, body)
	}
	for _, e := range []*env{a, b} {
		e.clock.Add(20*time.Second + keysvc.StaleGrace + time.Second)
	}
	var (
		wg      sync.WaitGroup
		flagged [2]int
	)
	for i, e := range []*env{a, b} {
		wg.Go(func() { flagged[i] = e.svc.Server.CheckStale(t.Context()) })
	}
	wg.Wait()
	if flagged[0]+flagged[1] != 1 {
		t.Fatalf("replicas flagged %v stale sessions, want one in all", flagged)
	}
	for _, e := range []*env{a, b} {
		if n := e.svc.Server.CheckStale(t.Context()); n != 0 {
			t.Fatalf("a session was flagged again (%d)", n)
		}
		if g := e.gauge(t, "keysvc_reattest_stale_sessions"); g != "1" {
			t.Fatalf("stale gauge %q, want 1 at each replica", g)
		}
	}
	if evs := a.listEvents(t, "kind=reattest-stale"); len(evs) != 1 || evs[0].SessionID != sessionID(t, mustJSON(t, api.UnlockResponse{Session: s2})) {
		t.Fatalf("stale events %+v, want one, of the second session", evs)
	}
	if code, rr, body := a.reattest(t, w, s2, 10); code != http.StatusOK || rr.State != api.StateActive {
		t.Fatalf("re-attestation at a after stale: %d %s", code, body)
	}
	if g := b.gauge(t, "keysvc_reattest_stale_sessions"); g != "0" {
		t.Fatalf("stale gauge at b %q after the session re-attested at a, want 0", g)
	}
	if evs := b.listEvents(t, "kind=reattest-resumed"); len(evs) != 1 {
		t.Fatalf("resumed events %+v, want one", evs)
	}
}

// TestSessionsSurviveUpgrade: a database from before the session key was
// stored (its service_keys empty, as migration 0008 leaves it) keeps the
// sessions an older keysvc issued: the key stored on first use is the one
// that keysvc derived from the master key.
func TestSessionsSurviveUpgrade(t *testing.T) {
	dir := t.TempDir()
	e := startEnv(t, dir)
	v := openVM(t)
	vol := setup(t, e, v, "old")
	code, b := e.unlock(t, v, "old", vol)
	if code != http.StatusOK {
		t.Fatalf("unlock: %d %s", code, b)
	}
	var ur api.UnlockResponse
	json.Unmarshal(b, &ur)
	e.stop(t)
	db, err := sql.Open("sqlite", filepath.Join(dir, store.DBFile))
	if err != nil {
		t.Fatal(err)
	}
	if r, err := db.Exec(`DELETE FROM service_keys`); err != nil {
		t.Fatal(err)
	} else if n, _ := r.RowsAffected(); n != 1 {
		t.Fatalf("%d stored service keys, want the session key alone", n)
	}
	db.Close()
	e = startEnv(t, dir)
	if code, state := e.heartbeat(t, ur.Session, "info"); code != http.StatusOK || state != api.StateActive {
		t.Fatalf("heartbeat of a session from before the key was stored: %d %q, want 200 active", code, state)
	}
}
