package testvm_test

import (
	"context"
	"fmt"
	"log"
	"path/filepath"
	"time"

	"github.com/keygate/keygate/testvm"
)

// Boot the measured guest, run one command in it and read its result from
// the serial console.
func Example() {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	dir := "/tmp/guest"
	g, err := testvm.PrepareGuest(ctx, dir) // kernel from the cache, OVMF, static keygate
	if err != nil {
		log.Fatal(err)
	}
	initrd := filepath.Join(dir, "initrd.cpio")
	if err := g.WriteInitramfs(initrd, nil); err != nil {
		log.Fatal(err)
	}
	cfg := g.Config(initrd)
	cfg.FwCfg = map[string][]byte{"script": []byte(`result pcrs "$(keygate tpm pcrs --tpm /dev/tpmrm0 --json | tr -d ' \n')"`)}
	vm, err := testvm.Start(cfg)
	if err != nil {
		log.Fatal(err)
	}
	defer vm.Close()
	pcrs, err := vm.Console.Result(ctx, "pcrs")
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(pcrs)
	if err := vm.Wait(ctx); err != nil { // the guest powers off after its script
		log.Fatal(err)
	}
}
