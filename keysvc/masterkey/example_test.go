package masterkey_test

import (
	"fmt"
	"log"
	"os"
	"path/filepath"

	"github.com/keygate/keygate/keysvc/masterkey"
)

func ExampleLoadOrCreate() {
	dir, _ := os.MkdirTemp("", "keysvc")
	defer os.RemoveAll(dir)

	key, created, err := masterkey.LoadOrCreate(filepath.Join(dir, "master.key"))
	if err != nil {
		log.Fatal(err)
	}
	defer key.Destroy()
	fmt.Println("created:", created)

	// Sub-keys are derived by label; each caller owns and destroys its copy.
	macKey, err := key.Derive(masterkey.LabelChallengeMAC)
	if err != nil {
		log.Fatal(err)
	}
	defer macKey.Destroy()
	fmt.Println("challenge MAC key bytes:", macKey.Size())
	// Output:
	// created: true
	// challenge MAC key bytes: 32
}

func ExampleKey_Seal() {
	dir, _ := os.MkdirTemp("", "keysvc")
	defer os.RemoveAll(dir)
	key, _, err := masterkey.LoadOrCreate(filepath.Join(dir, "master.key"))
	if err != nil {
		log.Fatal(err)
	}
	defer key.Destroy()

	// Seal a volume's unwrap key for storage, bound to the volume ID.
	sealed, err := key.Seal("vol-1", []byte("0123456789abcdef0123456789abcdef"))
	if err != nil {
		log.Fatal(err)
	}
	uk, err := key.Open("vol-1", sealed)
	if err != nil {
		log.Fatal(err)
	}
	defer uk.Destroy()
	fmt.Println("unwrap key bytes:", uk.Size())

	// The same blob presented for another record does not open.
	_, err = key.Open("vol-2", sealed)
	fmt.Println(err)
	// Output:
	// unwrap key bytes: 32
	// open record "vol-2": sealed record does not open (wrong record ID, wrong master key, or the record was altered)
}
