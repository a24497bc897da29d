package keysvc_test

import (
	"bytes"
	"context"
	"fmt"
	"net/http"
	"path/filepath"
	"sync"
	"testing"

	"github.com/keygate/keygate/keysvc"
	"github.com/keygate/keygate/keysvc/audit"
	"github.com/keygate/keygate/keysvc/masterkey"
	"github.com/keygate/keygate/keysvc/store"
)

// hookAuditor is an audit log that runs hook just before the first unlock
// record is appended: the moment between verification and release.
type hookAuditor struct {
	*audit.Log
	once sync.Once
	hook func()
}

func (a *hookAuditor) Append(ctx context.Context, ev audit.Event) (audit.Record, error) {
	if ev.Action == audit.ActionUnlock && a.hook != nil {
		a.once.Do(a.hook)
	}
	return a.Log.Append(ctx, ev)
}

func (a *hookAuditor) AppendUsing(ctx context.Context, use store.ChallengeUse, ev audit.Event) (audit.Record, error) {
	if ev.Action == audit.ActionUnlock && a.hook != nil {
		a.once.Do(a.hook)
	}
	return a.Log.AppendUsing(ctx, use, ev)
}

// TestReleaseRechecksAfterRace: an erase or revoke that commits while an
// unlock is being verified must win; the unlock gets a refusal, never a blob.
func TestReleaseRechecksAfterRace(t *testing.T) {
	v := openVM(t)
	for _, tc := range []struct {
		name, path, reason string
	}{
		{"erase", "/v1/admin/volumes/racer-vol/erase", keysvc.ReasonErased},
		{"revoke", "/v1/admin/vms/racer/revoke", keysvc.ReasonRevoked},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			// The service's own database and master key, through a second
			// handle, as another replica would hold them.
			mk, _, err := masterkey.LoadOrCreate(filepath.Join(dir, keysvc.MasterKeyFile))
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(mk.Destroy)
			st, err := store.OpenSQLite(context.Background(), dir)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { st.Close() })
			lg, err := audit.New(st, mk)
			if err != nil {
				t.Fatal(err)
			}
			ha := &hookAuditor{Log: lg}
			e := startEnv(t, dir, keysvc.WithAudit(ha))
			vol := setup(t, e, v, "racer")

			var hookErr error
			ha.hook = func() {
				req, _ := http.NewRequest("POST", "https://"+e.svc.AdminAddr()+tc.path, nil)
				req.Header.Set("Authorization", "Bearer "+e.token)
				resp, err := e.client.Do(req)
				if err == nil {
					resp.Body.Close()
					if resp.StatusCode != http.StatusOK {
						err = fmt.Errorf("%s answered %d", tc.path, resp.StatusCode)
					}
				}
				hookErr = err
			}
			code, body := e.unlock(t, v, "racer", vol)
			if hookErr != nil {
				t.Fatalf("racing %s: %v", tc.name, hookErr)
			}
			wantRefusal(t, code, body, tc.reason)
			if bytes.Contains(body, []byte("import_blob")) {
				t.Fatalf("the unlock that raced %s carries a blob", tc.name)
			}
		})
	}
}
