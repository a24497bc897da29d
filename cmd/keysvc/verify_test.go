package main

import (
	"bytes"
	"context"
	"database/sql"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/keygate/keygate/keysvc"
	"github.com/keygate/keygate/keysvc/store"
)

// TestServeUnknownDB: a --db that is neither sqlite nor a PostgreSQL URL
// is refused with the choices, exits non-zero, and creates nothing.
func TestServeUnknownDB(t *testing.T) {
	data := filepath.Join(t.TempDir(), "data")
	var out, errb bytes.Buffer
	code := run([]string{"serve", "--data", data, "--db", "mysql://keysvc@db.example/keysvc",
		"--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"}, nil, &out, &errb)
	if code == 0 || !strings.Contains(errb.String(), "use sqlite") || !strings.Contains(errb.String(), "postgres://") {
		t.Fatalf("exit %d; stdout %q stderr %q", code, out.String(), errb.String())
	}
	if _, err := os.Stat(data); !os.IsNotExist(err) {
		ents, _ := os.ReadDir(data)
		t.Fatalf("serve --db mysql created %s: %v", data, ents)
	}
}

// TestAuditVerifyTampered: `keysvc audit verify` exits non-zero and names
// the problem when a record was edited behind the service's back.
func TestAuditVerifyTampered(t *testing.T) {
	data := t.TempDir()
	start := func() *keysvc.Service {
		svc, err := keysvc.Start(context.Background(), keysvc.Config{DataDir: data, Listen: "127.0.0.1:0", AdminListen: "127.0.0.1:0",
			Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { svc.Shutdown(context.Background()) })
		t.Setenv("KEYSVC_SERVER", "https://"+svc.AdminAddr())
		t.Setenv("KEYSVC_CA", filepath.Join(data, keysvc.CAFile))
		return svc
	}
	tok := "--token-file=" + filepath.Join(data, keysvc.AdminTokenFile)
	ek := filepath.Join(t.TempDir(), "ek.pem")
	writePubPEM(t, ek)
	svc := start()
	for _, name := range []string{"a", "b"} {
		var out, errb bytes.Buffer
		if code := run([]string{"vm", "enroll", "--name", name, "--ek-pub", ek, tok}, nil, &out, &errb); code != 0 {
			t.Fatalf("enroll: %s", errb.String())
		}
	}
	var out, errb bytes.Buffer
	if code := run([]string{"audit", "verify", tok}, nil, &out, &errb); code != 0 {
		t.Fatalf("audit verify of an intact chain: exit %d %s %s", code, out.String(), errb.String())
	}
	if err := svc.Shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}

	db, err := sql.Open("sqlite", filepath.Join(data, store.DBFile))
	if err != nil {
		t.Fatal(err)
	}
	for _, q := range []string{"DROP TRIGGER audit_log_no_update", "UPDATE audit_log SET subject = 'evil' WHERE seq = 2"} {
		if _, err := db.Exec(q); err != nil {
			t.Fatalf("%s: %v", q, err)
		}
	}
	db.Close()

	start()
	out.Reset()
	errb.Reset()
	code := run([]string{"audit", "verify", tok}, nil, &out, &errb)
	if code == 0 || !strings.Contains(errb.String(), "failed verification") || !strings.Contains(out.String(), "seq 2: edited") {
		t.Fatalf("audit verify of an edited chain: exit %d; stdout %q stderr %q", code, out.String(), errb.String())
	}
}

// TestAuditVerifyNamesStoreTampering: `keysvc audit verify` exits non-zero
// and names what the chain alone cannot show: a VM or volume row changed
// behind the service's back, and a chain deleted whole.
func TestAuditVerifyNamesStoreTampering(t *testing.T) {
	for _, tc := range []struct {
		name string
		sql  []string
		want string
	}{
		{"vm-row", []string{"UPDATE vms SET provisioning_allowed = 1 WHERE name = 'a'"}, `vm "a"`},
		{"volume-row", []string{"UPDATE volumes SET vm = 'b' WHERE id = 'v'"}, `volume "v"`},
		{"chain-wiped", []string{"DROP TRIGGER audit_log_no_delete", "DELETE FROM audit_log", "DELETE FROM audit_head"}, "the chain is empty"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			data := t.TempDir()
			start := func() *keysvc.Service {
				svc, err := keysvc.Start(context.Background(), keysvc.Config{DataDir: data, Listen: "127.0.0.1:0", AdminListen: "127.0.0.1:0",
					Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { svc.Shutdown(context.Background()) })
				t.Setenv("KEYSVC_SERVER", "https://"+svc.AdminAddr())
				t.Setenv("KEYSVC_CA", filepath.Join(data, keysvc.CAFile))
				return svc
			}
			tok := "--token-file=" + filepath.Join(data, keysvc.AdminTokenFile)
			ek := filepath.Join(t.TempDir(), "ek.pem")
			writePubPEM(t, ek)
			svc := start()
			for _, args := range [][]string{
				{"vm", "enroll", "--name", "a", "--ek-pub", ek, tok},
				{"vm", "enroll", "--name", "b", "--ek-pub", ek, tok},
				{"volume", "create", "--id", "v", "--vm", "a", tok},
			} {
				var out, errb bytes.Buffer
				if code := run(args, nil, &out, &errb); code != 0 {
					t.Fatalf("%v: %s", args, errb.String())
				}
			}
			if err := svc.Shutdown(context.Background()); err != nil {
				t.Fatal(err)
			}
			db, err := sql.Open("sqlite", filepath.Join(data, store.DBFile))
			if err != nil {
				t.Fatal(err)
			}
			for _, q := range tc.sql {
				if _, err := db.Exec(q); err != nil {
					t.Fatalf("%s: %v", q, err)
				}
			}
			db.Close()
			start()
			var out, errb bytes.Buffer
			code := run([]string{"audit", "verify", tok}, nil, &out, &errb)
			if code == 0 || !strings.Contains(out.String()+errb.String(), tc.want) {
				t.Fatalf("audit verify: exit %d; stdout %q stderr %q; want it to name %s", code, out.String(), errb.String(), tc.want)
			}
			if list, ok := map[string][]string{"vm-row": {"vm", "list", tok}, "volume-row": {"volume", "list", tok}}[tc.name]; ok {
				out.Reset()
				if code := run(list, nil, &out, &errb); code != 0 || !strings.Contains(out.String(), "TAMPERED") {
					t.Fatalf("%v: exit %d, %q; want the row marked TAMPERED", list, code, out.String())
				}
			}
		})
	}
}
