package keysvc_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/keygate/keygate/keysvc"
	"github.com/keygate/keygate/keysvc/api"
	"github.com/keygate/keygate/keysvc/audit"
	"github.com/keygate/keygate/keysvc/masterkey"
	"github.com/keygate/keygate/keysvc/store"
	"github.com/keygate/keygate/tpm"
)

// legacyStore writes, in dir, the store a keysvc from before row MACs left:
// a VM and a volume without MACs, the UK sealed under the volume ID alone,
// an audit chain without a genesis record, and no anchor.
func legacyStore(t *testing.T, dir string, v *vmTPM) {
	t.Helper()
	ctx := context.Background()
	mk, _, err := masterkey.LoadOrCreate(filepath.Join(dir, keysvc.MasterKeyFile))
	if err != nil {
		t.Fatal(err)
	}
	defer mk.Destroy()
	st, err := store.OpenSQLite(ctx, dir)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	lg, err := audit.New(st, mk)
	if err != nil {
		t.Fatal(err)
	}
	defer lg.Destroy()
	pol, _ := json.Marshal(v.pcrPolicy(t, 0, 7))
	if _, err := lg.Append(ctx, audit.Event{Actor: "admin", Action: audit.ActionEnroll, Subject: "old"}); err != nil {
		t.Fatal(err)
	}
	if _, err := st.CreateVM(ctx, store.VM{Name: "old", EKPubPEM: v.ekPEM, AKPubPEM: v.akPEM, Policy: pol}); err != nil {
		t.Fatal(err)
	}
	sealed, err := mk.Seal("old-vol", ukBytes)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := st.CreateVolume(ctx, store.Volume{ID: "old-vol", VM: "old", SealedUK: sealed}); err != nil {
		t.Fatal(err)
	}
}

func startErr(dir string) error {
	svc, err := keysvc.Start(context.Background(), keysvc.Config{DataDir: dir, Listen: "127.0.0.1:0", AdminListen: "127.0.0.1:0", Logger: discardLogger()})
	if err == nil {
		svc.Shutdown(context.Background())
	}
	return err
}

// TestAdoptLegacyStore: the first start with the master key authenticates
// a store from before row MACs (re-sealing its UK to owner and EK) and
// unlocks keep working; after that, stripping the MACs and deleting the
// anchor, to have a swapped row adopted at the next start, is refused.
func TestAdoptLegacyStore(t *testing.T) {
	v := openVM(t)
	dir := t.TempDir()
	legacyStore(t, dir, v)
	e := startEnv(t, dir)
	code, body := e.unlock(t, v, "old", "old-vol")
	if code != http.StatusOK {
		t.Fatalf("unlock after adoption: %d %s", code, body)
	}
	if uk, err := v.importBlob(t, body, tpm.ECC); err != nil || !bytes.Equal(uk, ukBytes) {
		t.Fatalf("import after adoption: %v", err)
	}
	var rep api.AuditVerifyResponse
	json.Unmarshal(e.admin(t, "GET", "/v1/admin/audit/verify", nil, http.StatusOK), &rep)
	if !rep.OK {
		t.Fatalf("audit verify after adoption: %+v", rep)
	}
	if s := auditText(t, e); !strings.Contains(s, `"Action":"genesis"`) || !strings.Contains(s, `"adopted":2`) {
		t.Fatalf("no genesis record counting 2 adopted rows: %s", s)
	}
	e.stop(t)

	mallory := v.asMallory(t)
	for _, tc := range []struct {
		name string
		sql  []string
	}{
		{"anchor-deleted", []string{`DELETE FROM store_anchor`}},
		{"anchor-and-macs-deleted", []string{`DELETE FROM store_anchor`, `UPDATE vms SET row_mac = NULL`, `UPDATE volumes SET row_mac = NULL`,
			`UPDATE vms SET ek_pub_pem = :ek, ak_pub_pem = :ak`}},
		{"anchor-forged", []string{`UPDATE store_anchor SET created_ns = created_ns + 1`}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := t.TempDir()
			copyDir(t, dir, d)
			sqlExec(t, d, map[string]any{"ek": mallory.ekPEM, "ak": mallory.akPEM}, tc.sql...)
			if err := startErr(d); !errors.Is(err, keysvc.ErrAnchor) {
				t.Fatalf("start: %v, want ErrAnchor", err)
			}
		})
	}
}

// TestWipedChainDetected: deleting the whole audit chain (and its head)
// fails `keysvc audit verify` in a store with VMs, also once the service
// has begun a new chain, and also if the anchor is deleted too.
func TestWipedChainDetected(t *testing.T) {
	v := openVM(t)
	dir := t.TempDir()
	e := startEnv(t, dir)
	setup(t, e, v, "w")
	e.stop(t)
	wipe := []string{"DROP TRIGGER audit_log_no_delete", "DELETE FROM audit_log", "DELETE FROM audit_head"}
	for _, tc := range []struct {
		name string
		sql  []string
		want string
	}{
		{"chain-wiped", wipe, "the chain is empty"},
		{"chain-and-anchor-wiped", append(wipe, "DELETE FROM store_anchor", "UPDATE vms SET row_mac = NULL", "UPDATE volumes SET row_mac = NULL"), ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := t.TempDir()
			copyDir(t, dir, d)
			sqlExec(t, d, nil, tc.sql...)
			if tc.want == "" {
				// Without the anchor, a store whose chain is empty but
				// which holds VMs would be adopted as new: refused, since
				// its rows predate a chain that says nothing of them.
				if err := startErr(d); !errors.Is(err, keysvc.ErrAnchor) {
					t.Fatalf("start: %v, want ErrAnchor (a store whose chain and anchor were wiped is not adopted)", err)
				}
				return
			}
			e := startEnv(t, d)
			var rep api.AuditVerifyResponse
			json.Unmarshal(e.admin(t, "GET", "/v1/admin/audit/verify", nil, http.StatusOK), &rep)
			if rep.OK || !strings.Contains(strings.Join(rep.Problems, "\n"), tc.want) {
				t.Fatalf("wiped chain not reported: %+v", rep)
			}
			// The service's own next records begin a new chain; it is
			// still not the chain the anchor names.
			e.admin(t, "POST", "/v1/admin/vms/w/policy/learn", nil, http.StatusOK)
			json.Unmarshal(e.admin(t, "GET", "/v1/admin/audit/verify", nil, http.StatusOK), &rep)
			if rep.OK || !strings.Contains(strings.Join(rep.Problems, "\n"), "genesis record") {
				t.Fatalf("a new chain over a wiped one passes: %+v", rep)
			}
		})
	}
}

// copyDir copies the stopped service's data directory.
func copyDir(t *testing.T, from, to string) {
	t.Helper()
	ents, err := os.ReadDir(from)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		if !e.Type().IsRegular() {
			continue
		}
		b, err := os.ReadFile(filepath.Join(from, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(to, e.Name()), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
}
