package store

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
)

// TestPinnedReaders checks that the pinned readers answer concurrent reads
// correctly, found or not, and are all given back whatever the outcome.
func TestPinnedReaders(t *testing.T) {
	ctx := context.Background()
	s := openTemp(t)
	const vms = 8
	for i := range vms {
		name := fmt.Sprintf("vm-%d", i)
		if _, err := s.CreateVM(ctx, VM{Name: name, EKPubPEM: "ek-" + name}); err != nil {
			t.Fatal(err)
		}
		if _, err := s.CreateVolume(ctx, Volume{ID: "vol-" + name, VM: name, SealedUK: []byte(name)}); err != nil {
			t.Fatal(err)
		}
	}
	var (
		wg   sync.WaitGroup
		mu   sync.Mutex
		errs []error
	)
	fail := func(err error) {
		mu.Lock()
		errs = append(errs, err)
		mu.Unlock()
	}
	for g := range 4 * hotReaders {
		wg.Go(func() {
			for i := range 50 {
				name := fmt.Sprintf("vm-%d", (g+i)%vms)
				vm, vol, err := s.GetVMAndVolume(ctx, name, "vol-"+name)
				switch {
				case err != nil:
					fail(fmt.Errorf("read %s: %w", name, err))
				case vm.Name != name || vm.EKPubPEM != "ek-"+name || vol == nil || string(vol.SealedUK) != name:
					fail(fmt.Errorf("read %s: got vm %q ek %q volume %+v", name, vm.Name, vm.EKPubPEM, vol))
				}
				if _, _, err := s.GetVMAndVolume(ctx, "absent", "vol-"+name); !errors.Is(err, ErrNotFound) {
					fail(fmt.Errorf("read an absent VM: %v, want ErrNotFound", err))
				}
			}
		})
	}
	wg.Wait()
	for _, err := range errs {
		t.Error(err)
	}
	if n := len(s.readers); n != hotReaders {
		t.Errorf("%d of %d pinned readers given back", n, hotReaders)
	}
}

// TestPinnedReaderWaitHonoursContext checks that a read waiting for a free
// reader ends with its context, and that the readers then still work.
func TestPinnedReaderWaitHonoursContext(t *testing.T) {
	ctx := context.Background()
	s := openTemp(t)
	if _, err := s.CreateVM(ctx, VM{Name: "web", EKPubPEM: "ek"}); err != nil {
		t.Fatal(err)
	}
	var held []*readConn
	for range hotReaders {
		held = append(held, <-s.readers)
	}
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	if _, err := s.GetVM(cctx, "web"); !errors.Is(err, context.Canceled) {
		t.Errorf("read with every reader busy and a cancelled context: %v, want context.Canceled", err)
	}
	for _, rc := range held {
		s.readers <- rc
	}
	if v, err := s.GetVM(ctx, "web"); err != nil || v.Name != "web" {
		t.Errorf("read after the readers came back: %+v, %v", v, err)
	}
}
