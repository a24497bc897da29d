package store_test

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/keygate/keygate/keysvc/store"
)

func openStore(t *testing.T, dir string) *store.SQLite {
	t.Helper()
	s, err := store.OpenSQLite(context.Background(), dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// rawDB opens the store's database file directly, as an attacker or an
// operator with file access would.
func rawDB(t *testing.T, dir string) *sql.DB {
	t.Helper()
	db, err := sql.Open("sqlite", filepath.Join(dir, store.DBFile)+"?_pragma=busy_timeout(5000)")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	return db
}

func migrationFiles(t *testing.T) int {
	t.Helper()
	m, _ := filepath.Glob(filepath.Join("migrations", "*.sql"))
	if len(m) == 0 {
		t.Fatal("no migrations found under migrations/")
	}
	return len(m)
}

func TestMigrations(t *testing.T) {
	ctx := context.Background()
	want := migrationFiles(t)
	applied := func(t *testing.T, dir string) (n int, stamps string) {
		t.Helper()
		db := rawDB(t, dir)
		if err := db.QueryRow(`SELECT COUNT(*), GROUP_CONCAT(applied_ns) FROM schema_migrations`).Scan(&n, &stamps); err != nil {
			t.Fatal(err)
		}
		return n, stamps
	}

	t.Run("fresh", func(t *testing.T) {
		dir := t.TempDir()
		s := openStore(t, dir)
		s.Close()
		if n, _ := applied(t, dir); n != want {
			t.Errorf("%d migrations recorded, want %d", n, want)
		}
		st, err := os.Stat(filepath.Join(dir, store.DBFile))
		if err != nil {
			t.Fatal(err)
		}
		if st.Mode().Perm() != 0o600 {
			t.Errorf("database mode %v, want 0600", st.Mode().Perm())
		}
		var mode string
		if err := rawDB(t, dir).QueryRow(`PRAGMA journal_mode`).Scan(&mode); err != nil || mode != "wal" {
			t.Errorf("journal_mode %q (%v), want wal", mode, err)
		}
	})

	t.Run("reopen is a no-op", func(t *testing.T) {
		dir := t.TempDir()
		openStore(t, dir).Close()
		_, before := applied(t, dir)
		s := openStore(t, dir)
		if _, err := s.CreateVM(ctx, store.VM{Name: "vm1", EKPubPEM: "ek"}); err != nil {
			t.Fatal(err)
		}
		s.Close()
		openStore(t, dir).Close()
		n, after := applied(t, dir)
		if n != want || after != before {
			t.Errorf("after reopening: %d migrations stamped %s, want %d stamped %s", n, after, want, before)
		}
		if _, err := openStore(t, dir).GetVM(ctx, "vm1"); err != nil {
			t.Errorf("data lost across reopen: %v", err)
		}
	})

	t.Run("newer version refused", func(t *testing.T) {
		dir := t.TempDir()
		openStore(t, dir).Close()
		if _, err := rawDB(t, dir).Exec(`INSERT INTO schema_migrations VALUES (?, 'future.sql', 0)`, want+1); err != nil {
			t.Fatal(err)
		}
		s, err := store.OpenSQLite(ctx, dir)
		if err == nil {
			s.Close()
			t.Fatal("opened a database from a newer version")
		}
		if !errors.Is(err, store.ErrNewerSchema) {
			t.Errorf("error %v, want ErrNewerSchema", err)
		}
		if msg := err.Error(); !strings.Contains(msg, fmt.Sprint(want+1)) || !strings.Contains(msg, "restore a backup") {
			t.Errorf("error %q should name the version and the fix", msg)
		}
	})
}

func TestVMs(t *testing.T) { each(t, testVMs) }

func testVMs(t *testing.T, s store.Backend) {
	ctx := context.Background()
	vm, err := s.CreateVM(ctx, store.VM{Name: "web-1", EKPubPEM: "EK PEM", ProvisioningAllowed: true})
	if err != nil {
		t.Fatal(err)
	}
	if vm.Created.IsZero() || string(vm.Policy) != "{}" {
		t.Errorf("created VM %+v: want a creation time and policy {}", vm)
	}

	tests := []struct {
		name    string
		op      func() error
		wantErr error // nil: success
	}{
		{"create duplicate", func() error {
			_, err := s.CreateVM(ctx, store.VM{Name: "web-1", EKPubPEM: "x"})
			return err
		}, store.ErrExists},
		{"get missing", func() error { _, err := s.GetVM(ctx, "nope"); return err }, store.ErrNotFound},
		{"update missing", func() error {
			_, err := s.UpdateVM(ctx, "nope", func(*store.VM) error { return nil })
			return err
		}, store.ErrNotFound},
		{"update renames", func() error {
			_, err := s.UpdateVM(ctx, "web-1", func(v *store.VM) error { v.Name = "web-2"; return nil })
			return err
		}, store.ErrImmutable},
		{"update fn error writes nothing", func() error {
			boom := errors.New("boom")
			_, err := s.UpdateVM(ctx, "web-1", func(v *store.VM) error { v.Revoked = true; return boom })
			if !errors.Is(err, boom) {
				return fmt.Errorf("error %v, want boom", err)
			}
			if v, _ := s.GetVM(ctx, "web-1"); v.Revoked {
				return errors.New("a failed update was written")
			}
			return nil
		}, nil},
		{"update", func() error {
			v, err := s.UpdateVM(ctx, "web-1", func(v *store.VM) error {
				v.AKPubPEM, v.LearnArmed, v.Policy = "AK PEM", true, json.RawMessage(`{"pcrs":{"7":["aa"]}}`)
				return nil
			})
			if err != nil {
				return err
			}
			got, err := s.GetVM(ctx, "web-1")
			if err != nil {
				return err
			}
			if got.AKPubPEM != "AK PEM" || !got.LearnArmed || string(got.Policy) != `{"pcrs":{"7":["aa"]}}` ||
				!got.Updated.Equal(v.Updated) || !got.Created.Equal(vm.Created) || !got.ProvisioningAllowed {
				return fmt.Errorf("stored %+v, returned %+v", got, v)
			}
			return nil
		}, nil},
		{"invalid policy", func() error {
			_, err := s.UpdateVM(ctx, "web-1", func(v *store.VM) error { v.Policy = json.RawMessage("{"); return nil })
			if err == nil {
				return errors.New("accepted invalid JSON")
			}
			return nil
		}, nil},
		{"invalid name", func() error {
			_, err := s.CreateVM(ctx, store.VM{Name: "a b", EKPubPEM: "x"})
			if err == nil {
				return errors.New("accepted a name with a space")
			}
			return nil
		}, nil},
		{"missing EK", func() error {
			_, err := s.CreateVM(ctx, store.VM{Name: "no-ek"})
			if err == nil {
				return errors.New("accepted a VM without an EK")
			}
			return nil
		}, nil},
		{"list", func() error {
			if _, err := s.CreateVM(ctx, store.VM{Name: "app-1", EKPubPEM: "x"}); err != nil {
				return err
			}
			vms, err := s.ListVMs(ctx)
			if err != nil {
				return err
			}
			if len(vms) != 2 || vms[0].Name != "app-1" || vms[1].Name != "web-1" {
				return fmt.Errorf("listed %v", vms)
			}
			return nil
		}, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.op()
			if tt.wantErr == nil && err != nil {
				t.Fatal(err)
			}
			if tt.wantErr != nil && !errors.Is(err, tt.wantErr) {
				t.Fatalf("error %v, want %v", err, tt.wantErr)
			}
		})
	}
}

func TestVolumes(t *testing.T) { forEachBackend(t, testVolumes) }

func testVolumes(t *testing.T, b backend) {
	ctx := context.Background()
	dir := b.dir
	s := b.open(t)
	if _, err := s.CreateVM(ctx, store.VM{Name: "web-1", EKPubPEM: "x"}); err != nil {
		t.Fatal(err)
	}
	sealed := []byte("sealed-uk-bytes:" + strings.Repeat("0123456789", 5)) // 66 bytes, about a real sealed UK
	if _, err := s.CreateVolume(ctx, store.Volume{ID: "vol-1", VM: "web-1", SealedUK: sealed}); err != nil {
		t.Fatal(err)
	}
	erase := func(v *store.Volume) error { v.SealedUK = nil; return nil }

	tests := []struct {
		name    string
		op      func() error
		wantErr error
	}{
		{"create for unknown vm", func() error {
			_, err := s.CreateVolume(ctx, store.Volume{ID: "vol-9", VM: "nope", SealedUK: sealed})
			return err
		}, store.ErrNotFound},
		{"create duplicate", func() error {
			_, err := s.CreateVolume(ctx, store.Volume{ID: "vol-1", VM: "web-1", SealedUK: sealed})
			return err
		}, store.ErrExists},
		{"create without key", func() error {
			if _, err := s.CreateVolume(ctx, store.Volume{ID: "vol-8", VM: "web-1"}); err == nil {
				return errors.New("accepted a volume without a sealed UK")
			}
			return nil
		}, nil},
		{"get missing", func() error { _, err := s.GetVolume(ctx, "nope"); return err }, store.ErrNotFound},
		{"update missing", func() error { _, err := s.UpdateVolume(ctx, "nope", erase); return err }, store.ErrNotFound},
		{"move to another vm", func() error {
			_, err := s.UpdateVolume(ctx, "vol-1", func(v *store.Volume) error { v.VM = "app-1"; return nil })
			return err
		}, store.ErrImmutable},
		{"get", func() error {
			v, err := s.GetVolume(ctx, "vol-1")
			if err != nil {
				return err
			}
			if string(v.SealedUK) != string(sealed) || v.Erased() || v.VM != "web-1" {
				return fmt.Errorf("got %+v", v)
			}
			return nil
		}, nil},
		{"erase", func() error {
			if dir == "" {
				return eraseElsewhere(s)
			}
			// Put the sealed UK into the main database file first, as a
			// checkpoint would have long before an erase.
			if _, err := rawDB(t, dir).Exec(`PRAGMA wal_checkpoint(TRUNCATE)`); err != nil {
				return err
			}
			if b, _ := os.ReadFile(filepath.Join(dir, store.DBFile)); !strings.Contains(string(b), string(sealed)) {
				return errors.New("test setup: sealed UK not in the database file before erase")
			}
			v, err := s.UpdateVolume(ctx, "vol-1", erase)
			if err != nil {
				return err
			}
			got, err := s.GetVolume(ctx, "vol-1")
			if err != nil {
				return err
			}
			if !got.Erased() || got.ErasedAt.IsZero() || !got.ErasedAt.Equal(v.ErasedAt) {
				return fmt.Errorf("after erase got %+v", got)
			}
			// The sealed bytes must not linger in the database or its WAL.
			for _, f := range []string{store.DBFile, store.DBFile + "-wal"} {
				b, _ := os.ReadFile(filepath.Join(dir, f))
				if strings.Contains(string(b), string(sealed)) {
					return fmt.Errorf("erased sealed UK still present in %s", f)
				}
			}
			return nil
		}, nil},
		{"un-erase refused", func() error {
			_, err := s.UpdateVolume(ctx, "vol-1", func(v *store.Volume) error { v.SealedUK = sealed; return nil })
			return err
		}, store.ErrImmutable},
		{"list", func() error {
			if _, err := s.CreateVolume(ctx, store.Volume{ID: "vol-0", VM: "web-1", SealedUK: sealed}); err != nil {
				return err
			}
			all, err := s.ListVolumes(ctx, "")
			if err != nil {
				return err
			}
			mine, err := s.ListVolumes(ctx, "web-1")
			if err != nil {
				return err
			}
			none, err := s.ListVolumes(ctx, "other")
			if err != nil {
				return err
			}
			if len(all) != 2 || all[0].ID != "vol-0" || len(mine) != 2 || len(none) != 0 {
				return fmt.Errorf("listed all=%v mine=%v none=%v", all, mine, none)
			}
			return nil
		}, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.op()
			if tt.wantErr == nil && err != nil {
				t.Fatal(err)
			}
			if tt.wantErr != nil && !errors.Is(err, tt.wantErr) {
				t.Fatalf("error %v, want %v", err, tt.wantErr)
			}
		})
	}
}

func TestChallenges(t *testing.T) { each(t, testChallenges) }

func testChallenges(t *testing.T, s store.Backend) {
	ctx := context.Background()
	now := time.Now()
	if err := s.UseChallenge(ctx, "c1", now.Add(-time.Minute)); err != nil {
		t.Fatal(err)
	}
	if err := s.UseChallenge(ctx, "c2", now.Add(time.Minute)); err != nil {
		t.Fatal(err)
	}
	t.Run("replay refused", func(t *testing.T) {
		if err := s.UseChallenge(ctx, "c2", now.Add(time.Minute)); !errors.Is(err, store.ErrExists) {
			t.Fatalf("error %v, want ErrExists", err)
		}
	})
	t.Run("purge expired only", func(t *testing.T) {
		n, err := s.PurgeChallenges(ctx, now)
		if err != nil || n != 1 {
			t.Fatalf("purged %d (%v), want 1", n, err)
		}
		if err := s.UseChallenge(ctx, "c2", now.Add(time.Minute)); !errors.Is(err, store.ErrExists) {
			t.Fatalf("unexpired challenge was purged: %v", err)
		}
	})
}

// TestConcurrent hammers one store from many goroutines: read-modify-write
// updates must not be lost, and a challenge must be usable exactly once.
func TestConcurrent(t *testing.T) { each(t, testConcurrent) }

func testConcurrent(t *testing.T, s store.Backend) {
	ctx := context.Background()
	if _, err := s.CreateVM(ctx, store.VM{Name: "web-1", EKPubPEM: "x", Policy: json.RawMessage(`{"n":0}`)}); err != nil {
		t.Fatal(err)
	}
	const workers, each = 8, 10
	var (
		wg      sync.WaitGroup
		mu      sync.Mutex
		winners int
	)
	for w := range workers {
		wg.Go(func() {
			for i := range each {
				_, err := s.UpdateVM(ctx, "web-1", func(v *store.VM) error {
					var p struct{ N int }
					if err := json.Unmarshal(v.Policy, &p); err != nil {
						return err
					}
					v.Policy = json.RawMessage(fmt.Sprintf(`{"n":%d}`, p.N+1))
					return nil
				})
				if err != nil {
					t.Error(err)
				}
				if err := s.UseChallenge(ctx, fmt.Sprintf("w%d-%d", w, i), time.Now().Add(time.Minute)); err != nil {
					t.Error(err)
				}
				if _, err := s.GetVM(ctx, "web-1"); err != nil {
					t.Error(err)
				}
			}
			switch err := s.UseChallenge(ctx, "shared", time.Now().Add(time.Minute)); {
			case err == nil:
				mu.Lock()
				winners++
				mu.Unlock()
			case !errors.Is(err, store.ErrExists):
				t.Error(err)
			}
		})
	}
	wg.Wait()
	v, err := s.GetVM(ctx, "web-1")
	if err != nil {
		t.Fatal(err)
	}
	if want := fmt.Sprintf(`{"n":%d}`, workers*each); string(v.Policy) != want {
		t.Errorf("policy %s after concurrent updates, want %s (lost updates)", v.Policy, want)
	}
	if winners != 1 {
		t.Errorf("shared challenge accepted %d times, want once", winners)
	}
}

func TestAuditLog(t *testing.T) { forEachBackend(t, testAuditLog) }

func testAuditLog(t *testing.T, b backend) {
	ctx := context.Background()
	s := b.open(t)
	rec := func(seq uint64) (store.AuditRecord, store.AuditHead) {
		h := []byte(fmt.Sprintf("hash-%d", seq))
		return store.AuditRecord{Seq: seq, Time: time.Unix(0, int64(seq)).UTC(), Actor: "a", Action: "x", Subject: "s",
				Details: []byte(`{}`), PrevHash: []byte("p"), Hash: h, MAC: []byte("m")},
			store.AuditHead{Seq: seq, Hash: h, MAC: []byte("hm")}
	}
	for i := range 3 {
		err := s.AppendAudit(ctx, func(last *store.AuditRecord, head *store.AuditHead) (store.AuditRecord, store.AuditHead, error) {
			if (last == nil) != (i == 0) || (head == nil) != (i == 0) || (last != nil && last.Seq != uint64(i)) {
				return store.AuditRecord{}, store.AuditHead{}, fmt.Errorf("append %d saw last=%v head=%v", i, last, head)
			}
			r, h := rec(uint64(i + 1))
			return r, h, nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	t.Run("duplicate seq", func(t *testing.T) {
		err := s.AppendAudit(ctx, func(*store.AuditRecord, *store.AuditHead) (store.AuditRecord, store.AuditHead, error) {
			r, h := rec(2)
			return r, h, nil
		})
		if !errors.Is(err, store.ErrExists) {
			t.Fatalf("error %v, want ErrExists", err)
		}
	})
	t.Run("scan from", func(t *testing.T) {
		var seqs []uint64
		head, err := s.ScanAudit(ctx, 2, func(r store.AuditRecord) error {
			want, _ := rec(r.Seq)
			if !r.Time.Equal(want.Time) || string(r.Hash) != string(want.Hash) || string(r.Details) != "{}" {
				return fmt.Errorf("record %d read back as %+v", r.Seq, r)
			}
			seqs = append(seqs, r.Seq)
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		if fmt.Sprint(seqs) != "[2 3]" || head == nil || head.Seq != 3 {
			t.Errorf("scanned %v head %+v", seqs, head)
		}
	})
	t.Run("append-only triggers", func(t *testing.T) {
		if err := b.exec(t, `UPDATE audit_log SET actor = 'x' WHERE seq = 1`); err == nil {
			t.Error("UPDATE of audit_log allowed")
		}
		if err := b.exec(t, `DELETE FROM audit_log WHERE seq = 1`); err == nil {
			t.Error("DELETE from audit_log allowed")
		}
	})
}
