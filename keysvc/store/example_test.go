package store_test

import (
	"context"
	"errors"
	"fmt"
	"log"
	"os"

	"github.com/keygate/keygate/keysvc/store"
)

func ExampleOpenSQLite() {
	ctx := context.Background()
	dir, _ := os.MkdirTemp("", "keysvc")
	defer os.RemoveAll(dir)

	s, err := store.OpenSQLite(ctx, dir) // DIR/keysvc.db, migrated
	if err != nil {
		log.Fatal(err)
	}
	defer s.Close()

	if _, err := s.CreateVM(ctx, store.VM{Name: "web-1", EKPubPEM: "-----BEGIN PUBLIC KEY-----…"}); err != nil {
		log.Fatal(err)
	}
	// Read-modify-write in one transaction: arm learn mode.
	vm, err := s.UpdateVM(ctx, "web-1", func(v *store.VM) error { v.LearnArmed = true; return nil })
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(vm.Name, "learn armed:", vm.LearnArmed)

	_, err = s.GetVM(ctx, "web-2")
	fmt.Println(errors.Is(err, store.ErrNotFound))
	// Output:
	// web-1 learn armed: true
	// true
}
