package testvm

import (
	"context"
	"fmt"
	"os"
)

// Guest is everything a boot needs except the per-boot initramfs: the
// kernel with its modules, the firmware, and a static keygate.
type Guest struct {
	Kernel   *Kernel
	Firmware Firmware
	Keygate  string
}

// PrepareGuest fetches (or takes from the cache) the kernel with
// DefaultModules, finds OVMF and builds a static keygate into dir.
func PrepareGuest(ctx context.Context, dir string) (*Guest, error) {
	fw, err := FindOVMF()
	if err != nil {
		return nil, err
	}
	cache, err := CacheDir()
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(cache, 0o755); err != nil {
		return nil, fmt.Errorf("create the testvm cache: %w", err)
	}
	k, err := FetchKernel(ctx, cache, DefaultModules)
	if err != nil {
		return nil, err
	}
	kg, err := BuildKeygate(ctx, dir)
	if err != nil {
		return nil, err
	}
	return &Guest{Kernel: k, Firmware: fw, Keygate: kg}, nil
}

// WriteInitramfs writes the guest's initramfs, with extra files, to path.
func (g *Guest) WriteInitramfs(path string, files map[string][]byte) error {
	r := &Initramfs{Kernel: g.Kernel, Keygate: g.Keygate, Files: files}
	return r.Write(path)
}

// Config returns a Config that boots this guest from initrd.
func (g *Guest) Config(initrd string) Config {
	return Config{Firmware: g.Firmware, Kernel: g.Kernel.Image, Initrd: initrd, Cmdline: BaseCmdline}
}
