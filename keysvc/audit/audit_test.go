package audit_test

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"database/sql"
	"encoding/binary"
	"errors"
	"fmt"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/keygate/keygate/keysvc/audit"
	"github.com/keygate/keygate/keysvc/masterkey"
	"github.com/keygate/keygate/keysvc/store"
)

type fixture struct {
	dir string
	st  *store.SQLite
	mk  *masterkey.Key
	log *audit.Log
}

func newFixture(t *testing.T) *fixture {
	t.Helper()
	dir := t.TempDir()
	st, err := store.OpenSQLite(context.Background(), dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	mk, _, err := masterkey.LoadOrCreate(filepath.Join(dir, "master.key"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(mk.Destroy)
	var tick int64
	clock := func() time.Time { tick++; return time.Unix(1_800_000_000, tick*1000) }
	l, err := audit.New(st, mk, audit.WithClock(clock))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(l.Destroy)
	return &fixture{dir: dir, st: st, mk: mk, log: l}
}

var sampleEvents = []audit.Event{
	{Actor: "admin:alice", Action: audit.ActionEnroll, Subject: "web-1", Details: audit.Enroll{EKFingerprint: "ab12", Provisioning: true}},
	{Actor: "admin:alice", Action: audit.ActionLearn, Subject: "web-1", Details: audit.Learn{Armed: true}},
	{Actor: "vm:web-1", Action: audit.ActionLearn, Subject: "web-1", Details: audit.Learn{PCRs: map[int]string{7: "aa", 4: "bb"}}},
	{Actor: "vm:web-1", Action: audit.ActionUnlock, Subject: "vol-1", Details: audit.Unlock{Volume: "vol-1", SessionID: "s1"}},
	{Actor: "vm:web-1", Action: audit.ActionDeny, Subject: "vol-1", Details: audit.Deny{Volume: "vol-1", Reason: "pcr mismatch",
		Mismatches: []audit.PCRMismatch{{PCR: 7, Allowed: []string{"aa"}, Got: "cc"}}}},
	{Actor: "admin:bob", Action: audit.ActionAdmin, Subject: "/v1/admin/vms", Details: audit.Admin{Method: "GET", Path: "/v1/admin/vms", Status: 401}},
	{Actor: "vm:web-1", Action: audit.ActionAlert, Subject: "web-1", Details: audit.Alert{Kind: "ptrace", Severity: "high", PID: 42}},
	{Actor: "admin:alice", Action: audit.ActionRevoke, Subject: "web-1", Details: audit.Revoke{Reason: "decommissioned"}},
	{Actor: "admin:alice", Action: audit.ActionErase, Subject: "vol-1", Details: audit.Erase{Volume: "vol-1"}},
	{Actor: "keysvc", Action: audit.ActionAdmin, Subject: "startup"},
}

// fill appends the sample events and returns the records.
func (f *fixture) fill(t *testing.T) []audit.Record {
	t.Helper()
	var out []audit.Record
	for _, ev := range sampleEvents {
		r, err := f.log.Append(context.Background(), ev)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, r)
	}
	return out
}

// raw opens the database file directly and drops the append-only triggers,
// as an attacker with write access to the file can.
func (f *fixture) raw(t *testing.T) *sql.DB {
	t.Helper()
	db, err := sql.Open("sqlite", filepath.Join(f.dir, store.DBFile)+"?_pragma=busy_timeout(5000)")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	for _, q := range []string{`DROP TRIGGER audit_log_no_update`, `DROP TRIGGER audit_log_no_delete`} {
		if _, err := db.Exec(q); err != nil {
			t.Fatal(err)
		}
	}
	return db
}

// specHash recomputes a record's hash from the encoding documented in the
// package doc, independently of the package's own code.
func specHash(seq uint64, tns int64, actor, action, subject string, details, prev []byte) []byte {
	var b bytes.Buffer
	b.WriteString("keygate audit record v1\x00")
	binary.Write(&b, binary.BigEndian, seq)
	binary.Write(&b, binary.BigEndian, tns)
	for _, f := range [][]byte{[]byte(actor), []byte(action), []byte(subject), details, prev} {
		binary.Write(&b, binary.BigEndian, uint32(len(f)))
		b.Write(f)
	}
	h := sha256.Sum256(b.Bytes())
	return h[:]
}

func TestAppendVerify(t *testing.T) {
	ctx := context.Background()
	f := newFixture(t)

	t.Run("empty log verifies", func(t *testing.T) {
		rep, err := f.log.Verify(ctx)
		if err != nil || rep.Records != 0 {
			t.Fatalf("Verify = %+v, %v", rep, err)
		}
	})

	recs := f.fill(t)
	t.Run("records chain", func(t *testing.T) {
		prev := make([]byte, sha256.Size)
		mac, err := f.mk.Derive(masterkey.LabelAuditMAC)
		if err != nil {
			t.Fatal(err)
		}
		defer mac.Destroy()
		for i, r := range recs {
			if r.Seq != uint64(i+1) || !bytes.Equal(r.PrevHash, prev) {
				t.Errorf("record %d: seq %d, prev_hash linked %v", i, r.Seq, bytes.Equal(r.PrevHash, prev))
			}
			want := specHash(r.Seq, r.Time.UnixNano(), r.Actor, string(r.Action), r.Subject, r.Details, r.PrevHash)
			if !bytes.Equal(r.Hash, want) {
				t.Errorf("record %d: hash does not follow the documented encoding", r.Seq)
			}
			m := hmac.New(sha256.New, mac.Bytes())
			m.Write(r.Hash)
			if !hmac.Equal(r.MAC, m.Sum(nil)) {
				t.Errorf("record %d: mac is not HMAC-SHA256(audit key, hash)", r.Seq)
			}
			prev = r.Hash
		}
		if string(recs[9].Details) != "{}" {
			t.Errorf("nil details stored as %s, want {}", recs[9].Details)
		}
	})

	t.Run("good chain verifies", func(t *testing.T) {
		rep, err := f.log.Verify(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if !rep.OK() || rep.Records != 10 || rep.LastSeq != 10 || rep.Head != 10 {
			t.Errorf("report %+v", rep)
		}
	})

	t.Run("scan", func(t *testing.T) {
		var n int
		err := f.log.Scan(ctx, 4, func(r audit.Record) error {
			if !bytes.Equal(r.Hash, recs[r.Seq-1].Hash) {
				return fmt.Errorf("record %d differs", r.Seq)
			}
			n++
			return nil
		})
		if err != nil || n != 7 {
			t.Fatalf("scanned %d records (%v), want 7", n, err)
		}
	})
}

func TestConcurrentAppends(t *testing.T) {
	ctx := context.Background()
	f := newFixture(t)
	// A second Log (as a second replica would have) over its own connection
	// pool to the same database file.
	st2, err := store.OpenSQLite(ctx, f.dir)
	if err != nil {
		t.Fatal(err)
	}
	defer st2.Close()
	log2, err := audit.New(st2, f.mk)
	if err != nil {
		t.Fatal(err)
	}
	defer log2.Destroy()

	const workers, each = 8, 8
	var wg sync.WaitGroup
	for w := range workers {
		l := f.log
		if w%2 == 1 {
			l = log2
		}
		wg.Go(func() {
			for i := range each {
				ev := audit.Event{Actor: fmt.Sprintf("worker:%d", w), Action: audit.ActionUnlock, Subject: fmt.Sprint(i),
					Details: audit.Unlock{Volume: fmt.Sprintf("vol-%d", i)}}
				if _, err := l.Append(ctx, ev); err != nil {
					t.Error(err)
					return
				}
			}
		})
	}
	wg.Wait()
	rep, err := f.log.Verify(ctx)
	if err != nil {
		t.Fatalf("Verify after concurrent appends: %v (%v)", err, rep.Problems)
	}
	if rep.Records != workers*each || rep.Head != workers*each {
		t.Errorf("report %+v, want %d records", rep, workers*each)
	}
}

func TestVerifyDetects(t *testing.T) {
	ctx := context.Background()
	tests := []struct {
		name     string
		tamper   func(t *testing.T, f *fixture, db *sql.DB)
		wantSeq  uint64
		wantKind audit.Kind
	}{
		{
			name: "edited details",
			tamper: func(t *testing.T, f *fixture, db *sql.DB) {
				mustExec(t, db, `UPDATE audit_log SET details = '{"volume":"vol-2"}' WHERE seq = 4`)
			},
			wantSeq: 4, wantKind: audit.KindEdited,
		},
		{
			name: "edited time",
			tamper: func(t *testing.T, f *fixture, db *sql.DB) {
				mustExec(t, db, `UPDATE audit_log SET time_ns = time_ns + 1 WHERE seq = 2`)
			},
			wantSeq: 2, wantKind: audit.KindEdited,
		},
		{
			name: "forged with recomputed hash",
			tamper: func(t *testing.T, f *fixture, db *sql.DB) {
				var (
					tns                    int64
					actor, action, subject string
					prev                   []byte
				)
				if err := db.QueryRow(`SELECT time_ns, actor, action, subject, prev_hash FROM audit_log WHERE seq = 5`).
					Scan(&tns, &actor, &action, &subject, &prev); err != nil {
					t.Fatal(err)
				}
				details := []byte(`{"volume":"vol-1","reason":"nothing to see"}`)
				h := specHash(5, tns, actor, "unlock", subject, details, prev)
				mustExec(t, db, `UPDATE audit_log SET action = 'unlock', details = ?, hash = ? WHERE seq = 5`, string(details), h)
			},
			wantSeq: 5, wantKind: audit.KindForged,
		},
		{
			name: "deleted middle record",
			tamper: func(t *testing.T, f *fixture, db *sql.DB) {
				mustExec(t, db, `DELETE FROM audit_log WHERE seq = 6`)
			},
			wantSeq: 6, wantKind: audit.KindMissing,
		},
		{
			name: "deleted first record",
			tamper: func(t *testing.T, f *fixture, db *sql.DB) {
				mustExec(t, db, `DELETE FROM audit_log WHERE seq = 1`)
			},
			wantSeq: 1, wantKind: audit.KindMissing,
		},
		{
			name: "deleted tail records",
			tamper: func(t *testing.T, f *fixture, db *sql.DB) {
				mustExec(t, db, `DELETE FROM audit_log WHERE seq >= 8`)
			},
			wantSeq: 8, wantKind: audit.KindTruncated,
		},
		{
			name: "deleted tail records and head",
			tamper: func(t *testing.T, f *fixture, db *sql.DB) {
				mustExec(t, db, `DELETE FROM audit_log WHERE seq >= 8`)
				mustExec(t, db, `DELETE FROM audit_head`)
			},
			wantSeq: 7, wantKind: audit.KindHead,
		},
		{
			name: "head moved back without the key",
			tamper: func(t *testing.T, f *fixture, db *sql.DB) {
				mustExec(t, db, `DELETE FROM audit_log WHERE seq >= 8`)
				mustExec(t, db, `UPDATE audit_head SET seq = 7, hash = (SELECT hash FROM audit_log WHERE seq = 7)`)
			},
			wantSeq: 7, wantKind: audit.KindHead,
		},
		{
			name: "records swapped",
			tamper: func(t *testing.T, f *fixture, db *sql.DB) {
				mustExec(t, db, `UPDATE audit_log SET seq = 100 WHERE seq = 3`)
				mustExec(t, db, `UPDATE audit_log SET seq = 3 WHERE seq = 2`)
				mustExec(t, db, `UPDATE audit_log SET seq = 2 WHERE seq = 100`)
			},
			wantSeq: 2, wantKind: audit.KindEdited,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := newFixture(t)
			f.fill(t)
			tt.tamper(t, f, f.raw(t))
			rep, err := f.log.Verify(ctx)
			if !errors.Is(err, audit.ErrTampered) {
				t.Fatalf("Verify error %v, want ErrTampered", err)
			}
			if len(rep.Problems) == 0 {
				t.Fatal("no problems reported")
			}
			if p := rep.Problems[0]; p.Seq != tt.wantSeq || p.Kind != tt.wantKind {
				t.Errorf("first problem %v, want seq %d %s; all: %v", p, tt.wantSeq, tt.wantKind, rep.Problems)
			}
			// The service must refuse to extend a damaged chain end.
			if tt.wantSeq >= 7 {
				if _, err := f.log.Append(ctx, sampleEvents[0]); !errors.Is(err, audit.ErrChainBroken) {
					t.Errorf("Append on a damaged chain end: %v, want ErrChainBroken", err)
				}
			}
		})
	}

	t.Run("wrong key", func(t *testing.T) {
		f := newFixture(t)
		f.fill(t)
		other, _, err := masterkey.LoadOrCreate(filepath.Join(t.TempDir(), "other.key"))
		if err != nil {
			t.Fatal(err)
		}
		defer other.Destroy()
		l, err := audit.New(f.st, other)
		if err != nil {
			t.Fatal(err)
		}
		defer l.Destroy()
		rep, err := l.Verify(ctx)
		if !errors.Is(err, audit.ErrTampered) || rep.OK() || rep.Problems[0].Seq != 1 || rep.Problems[0].Kind != audit.KindForged {
			t.Fatalf("Verify with the wrong key = %v, %v", rep.Problems, err)
		}
		if _, err := l.Append(ctx, sampleEvents[0]); !errors.Is(err, audit.ErrChainBroken) {
			t.Errorf("Append with the wrong key: %v, want ErrChainBroken", err)
		}
	})

	// The documented limit: restoring a head that was genuinely MAC'd earlier,
	// together with deleting the records after it, is not detectable without
	// an external anchor.
	t.Run("rollback to an old genuine head is undetected", func(t *testing.T) {
		f := newFixture(t)
		for _, ev := range sampleEvents[:7] {
			if _, err := f.log.Append(ctx, ev); err != nil {
				t.Fatal(err)
			}
		}
		db := f.raw(t)
		var (
			seq       int64
			hash, mac []byte
		)
		if err := db.QueryRow(`SELECT seq, hash, mac FROM audit_head`).Scan(&seq, &hash, &mac); err != nil {
			t.Fatal(err)
		}
		for _, ev := range sampleEvents[7:] {
			if _, err := f.log.Append(ctx, ev); err != nil {
				t.Fatal(err)
			}
		}
		mustExec(t, db, `DELETE FROM audit_log WHERE seq > ?`, seq)
		mustExec(t, db, `UPDATE audit_head SET seq = ?, hash = ?, mac = ?`, seq, hash, mac)
		if rep, err := f.log.Verify(ctx); err != nil || rep.Records != 7 {
			t.Fatalf("expected the documented blind spot (rollback passes); got %v, %v", rep, err)
		}
	})
}

func mustExec(t *testing.T, db *sql.DB, q string, args ...any) {
	t.Helper()
	if _, err := db.Exec(q, args...); err != nil {
		t.Fatalf("%s: %v", q, err)
	}
}
