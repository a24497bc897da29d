package disk

import (
	"runtime"
	"sync"
	"sync/atomic"
)

// spreadPiece is the unit readSectorsSpread hands its goroutines: each
// reads a piece and decrypts it while it is still in the core's cache, so
// the data crosses memory once per pass rather than once for the pread and
// again for the cipher.
const spreadPiece = 64 << 10

// readSectorsSpread is readSectors for a big run, read and decrypted in
// pieces on GOMAXPROCS goroutines: a 9P Tread of 512 KiB (the msize Linux
// negotiates) is then read and deciphered by every core, into the reply
// buffer directly. Runs below gatherParallel, or without a cipher, or with
// one core, take readSectors. On error, the content of p is undefined, as
// with readSectors.
func (s *segment) readSectorsSpread(p []byte, sec int64) error {
	workers := min(runtime.GOMAXPROCS(0), len(p)/spreadPiece)
	if s.c == nil || workers < 2 || len(p) < gatherParallel {
		return s.readSectors(p, sec)
	}
	pieces := (len(p) + spreadPiece - 1) / spreadPiece
	per := int64(spreadPiece / s.ss)
	var next atomic.Int64
	var failed atomic.Pointer[error]
	work := func() {
		for i := next.Add(1) - 1; i < int64(pieces) && failed.Load() == nil; i = next.Add(1) - 1 {
			lo := i * spreadPiece
			hi := min(lo+spreadPiece, int64(len(p)))
			if err := s.readSectors(p[lo:hi], sec+i*per); err != nil {
				failed.CompareAndSwap(nil, &err)
			}
		}
	}
	var wg sync.WaitGroup
	for range workers - 1 {
		wg.Go(work)
	}
	work()
	wg.Wait()
	if err := failed.Load(); err != nil {
		return *err
	}
	return nil
}
