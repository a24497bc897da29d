package audit_test

import (
	"context"
	"fmt"
	"log"
	"os"
	"path/filepath"

	"github.com/keygate/keygate/keysvc/audit"
	"github.com/keygate/keygate/keysvc/masterkey"
	"github.com/keygate/keygate/keysvc/store"
)

func ExampleLog_Append() {
	ctx := context.Background()
	dir, _ := os.MkdirTemp("", "keysvc")
	defer os.RemoveAll(dir)
	st, err := store.OpenSQLite(ctx, dir)
	if err != nil {
		log.Fatal(err)
	}
	defer st.Close()
	mk, _, err := masterkey.LoadOrCreate(filepath.Join(dir, "master.key"))
	if err != nil {
		log.Fatal(err)
	}
	defer mk.Destroy()
	l, err := audit.New(st, mk)
	if err != nil {
		log.Fatal(err)
	}
	defer l.Destroy()

	rec, err := l.Append(ctx, audit.Event{
		Actor:   "vm:web-1",
		Action:  audit.ActionDeny,
		Subject: "vol-1",
		Details: audit.Deny{Volume: "vol-1", Reason: "pcr mismatch",
			Mismatches: []audit.PCRMismatch{{PCR: 7, Allowed: []string{"aa"}, Got: "bb"}}},
	})
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(rec.Seq, rec.Action, string(rec.Details))
	// Output:
	// 1 deny {"volume":"vol-1","reason":"pcr mismatch","mismatches":[{"pcr":7,"allowed":["aa"],"got":"bb"}]}
}

func ExampleLog_Verify() {
	ctx := context.Background()
	dir, _ := os.MkdirTemp("", "keysvc")
	defer os.RemoveAll(dir)
	st, err := store.OpenSQLite(ctx, dir)
	if err != nil {
		log.Fatal(err)
	}
	defer st.Close()
	mk, _, err := masterkey.LoadOrCreate(filepath.Join(dir, "master.key"))
	if err != nil {
		log.Fatal(err)
	}
	defer mk.Destroy()
	l, err := audit.New(st, mk)
	if err != nil {
		log.Fatal(err)
	}
	defer l.Destroy()

	for _, vol := range []string{"vol-1", "vol-2"} {
		if _, err := l.Append(ctx, audit.Event{Actor: "admin:alice", Action: audit.ActionErase, Subject: vol,
			Details: audit.Erase{Volume: vol}}); err != nil {
			log.Fatal(err)
		}
	}
	rep, err := l.Verify(ctx)
	fmt.Println(rep.Records, rep.OK(), err)
	// Output:
	// 2 true <nil>
}
