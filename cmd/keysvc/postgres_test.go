package main

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5"

	"github.com/keygate/keygate/internal/pgtest"
	"github.com/keygate/keygate/keysvc"
)

func TestMain(m *testing.M) { os.Exit(pgtest.Main(m)) }

// copyDir copies a data directory's files, as an operator making a
// replica would.
func copyDir(t *testing.T, from string) string {
	t.Helper()
	to := filepath.Join(t.TempDir(), "replica")
	if err := os.Mkdir(to, 0o700); err != nil {
		t.Fatal(err)
	}
	ents, err := os.ReadDir(from)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		if e.IsDir() || strings.HasPrefix(e.Name(), "keysvc.db") {
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
	return to
}

// TestServePostgres: serve --db postgres://… runs on PostgreSQL and keeps
// its records there; a replica from a copy of the data directory shares
// them; a data directory with another master key is refused with what to
// do, and writes nothing.
func TestServePostgres(t *testing.T) {
	url := pgtest.Shared(t).NewDB(t)
	data := filepath.Join(t.TempDir(), "data")
	first := serveOnce(t, data, "--db", url)
	if !strings.Contains(first, "created now:") {
		t.Fatalf("first start: %s", first)
	}
	if _, err := os.Stat(filepath.Join(data, "keysvc.db")); !os.IsNotExist(err) {
		t.Fatalf("serve --db postgres made an SQLite file: %v", err)
	}
	serveOnce(t, copyDir(t, data), "--db", url, "--hostname", "replica-2.example")

	other := filepath.Join(t.TempDir(), "other")
	var out, errb bytes.Buffer
	code := run([]string{"serve", "--data", other, "--db", url, "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"}, nil, &out, &errb)
	msg := errb.String()
	if code == 0 || !strings.Contains(msg, "different master key") || !strings.Contains(msg, "copy of the first replica's data directory") {
		t.Fatalf("a replica with another master key: exit %d, stderr %q", code, msg)
	}
}

// TestMigrate: migrate copies a used SQLite store into PostgreSQL with its
// chain unchanged (verified by the command, then by audit verify against a
// service on the copy), and refuses a target that is not empty.
func TestMigrate(t *testing.T) {
	data := t.TempDir()
	tok := "--token-file=" + filepath.Join(data, keysvc.AdminTokenFile)
	start := func(db string) *keysvc.Service {
		svc, err := keysvc.Start(context.Background(), keysvc.Config{DataDir: data, DB: db, Listen: "127.0.0.1:0", AdminListen: "127.0.0.1:0",
			Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
		if err != nil {
			t.Fatal(err)
		}
		t.Setenv("KEYSVC_SERVER", "https://"+svc.AdminAddr())
		t.Setenv("KEYSVC_CA", filepath.Join(data, keysvc.CAFile))
		return svc
	}
	cmd := func(args ...string) string {
		t.Helper()
		var out, errb bytes.Buffer
		if code := run(args, nil, &out, &errb); code != 0 {
			t.Fatalf("keysvc %v: exit %d: %s", args, code, errb.String())
		}
		return out.String()
	}
	ek := filepath.Join(t.TempDir(), "ek.pem")
	writePubPEM(t, ek)
	svc := start("")
	for _, name := range []string{"a", "b"} {
		cmd("vm", "enroll", "--name", name, "--ek-pub", ek, tok)
	}
	cmd("volume", "create", "--id", "a-data", "--vm", "a", tok)
	cmd("volume", "create", "--id", "b-data", "--vm", "b", tok)
	cmd("erase", "--volume", "b-data", tok)        // an erased row: no key, an erase time
	cmd("volume", "rotate", "--id", "a-data", tok) // a pending rotation: its generation and MAC
	sqliteVerify := cmd("audit", "verify", "--json", tok)
	svc.Shutdown(context.Background())

	url := pgtest.Shared(t).NewDB(t)
	var rep keysvc.MigrateReport
	if err := json.Unmarshal([]byte(cmd("migrate", "--from", filepath.Join(data, "keysvc.db"), "--to", url, "--json")), &rep); err != nil {
		t.Fatal(err)
	}
	if c := rep.Copied; c.VMs != 2 || c.Volumes != 2 || c.Audit == 0 || !c.Anchor || !c.MasterKey || rep.AuditRecords != uint64(c.Audit) {
		t.Fatalf("migrate report %+v", rep)
	}

	svc = start(url)
	defer svc.Shutdown(context.Background())
	if out := cmd("vm", "list", tok); !strings.Contains(out, "a") || !strings.Contains(out, "b") {
		t.Fatalf("vm list on the copy: %s", out)
	}
	if out := cmd("volume", "list", "--vm", "b", "--json", tok); !strings.Contains(out, `"erased_at"`) {
		t.Fatalf("the erased volume on the copy: %s", out)
	}
	if out := cmd("volume", "list", "--vm", "a", "--json", tok); !strings.Contains(out, `"rotation": "pending"`) {
		t.Fatalf("the pending rotation on the copy: %s", out)
	}
	var before, after struct {
		Records  uint64
		OK       bool
		Problems []string
	}
	json.Unmarshal([]byte(sqliteVerify), &before)
	json.Unmarshal([]byte(cmd("audit", "verify", "--json", tok)), &after)
	if !after.OK {
		t.Errorf("audit verify on the copy: %v", after.Problems)
	}
	if before.Records == 0 || after.Records <= before.Records {
		t.Errorf("audit verify on the copy: %d records, on SQLite %d; want the copy to hold them all and what came after", after.Records, before.Records)
	}

	var out, errb bytes.Buffer
	code := run([]string{"migrate", "--from", data, "--to", url}, nil, &out, &errb)
	if code == 0 || !strings.Contains(errb.String(), "not empty") {
		t.Fatalf("migrate into a used database: exit %d, stderr %q", code, errb.String())
	}
}

// TestAdminTokenRotatePostgres: admin-token rotate --db records the
// rotation in the PostgreSQL store's chain, and refuses a data directory
// whose master key is not the database's.
func TestAdminTokenRotatePostgres(t *testing.T) {
	url := pgtest.Shared(t).NewDB(t)
	data := filepath.Join(t.TempDir(), "data")
	serveOnce(t, data, "--db", url)
	old, _ := os.ReadFile(filepath.Join(data, keysvc.AdminTokenFile))
	var out, errb bytes.Buffer
	if code := run([]string{"admin-token", "rotate", "--data", data, "--db", url}, nil, &out, &errb); code != 0 {
		t.Fatalf("rotate: exit %d: %s", code, errb.String())
	}
	if now, _ := os.ReadFile(filepath.Join(data, keysvc.AdminTokenFile)); bytes.Equal(now, old) {
		t.Fatal("the token did not change")
	}
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, url)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	var n int
	if err := conn.QueryRow(ctx, `SELECT count(*) FROM audit_log WHERE action = 'rotate' AND subject = 'admin-token'`).Scan(&n); err != nil || n != 1 {
		t.Fatalf("%d rotation records in PostgreSQL (%v), want 1", n, err)
	}

	other := filepath.Join(t.TempDir(), "other")
	serveOnce(t, other) // a data directory of its own, with another master key
	errb.Reset()
	if code := run([]string{"admin-token", "rotate", "--data", other, "--db", url}, nil, &out, &errb); code == 0 || !strings.Contains(errb.String(), "different master key") {
		t.Fatalf("rotate with another master key: exit %d, stderr %q", code, errb.String())
	}
}
