package disk

import (
	"fmt"
	"runtime"
	"sync"
	"sync/atomic"

	"github.com/diskfs/go-diskfs/backend"
	"golang.org/x/sys/unix"
)

// gatherParallel is the chunk size from which writeGather encrypts the
// pieces of a chunk on several goroutines (as xts does for one batch from
// 256 KiB): a flush's pieces are 64 KiB pages, each below xts's own
// threshold.
const gatherParallel = 256 << 10

// writeGather writes the concatenation of pieces at off, as one WriteAt of
// it would, without copying the pieces together first: a flush writes its
// file's pages (64 KiB each, consecutive on disk) this way, so the cipher
// reads each page once, straight into the chunk the file gets in one
// pwrite, and the pages of a chunk are encrypted on every core. Pieces
// that are not whole sectors at a sector boundary go through WriteAt's
// path one by one. The slices in pieces are resliced as they are used.
func (d *Device) writeGather(pieces [][]byte, off int64) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return ErrClosed
	}
	if d.readOnly {
		return backend.ErrIncorrectOpenMode
	}
	ss, total := int64(d.ss), int64(0)
	aligned := off%ss == 0
	for _, p := range pieces {
		total += int64(len(p))
		aligned = aligned && int64(len(p))%ss == 0
	}
	if off < 0 || off+total > d.size {
		return fmt.Errorf("write %d bytes at %d: beyond the end of the %d-byte device", total, off, d.size)
	}
	if !aligned || total < bypassSize {
		for _, p := range pieces {
			if _, err := d.writeAt(p, off); err != nil {
				return err
			}
			off += int64(len(p))
		}
		return nil
	}
	sec := off / ss
	d.eachCached(sec, total/ss, d.drop)
	if len(d.scratch) < chunkSize {
		d.scratch = make([]byte, chunkSize)
	}
	type job struct {
		dst, src []byte
		sec      int64
	}
	var jobs []job
	var errs []error // one per job, so that parallel workers need no lock
	for len(pieces) > 0 {
		// fill one chunk of scratch with the next pieces (or parts)
		jobs = jobs[:0]
		m := 0
		for len(pieces) > 0 && m < chunkSize {
			n := min(len(pieces[0]), chunkSize-m)
			jobs = append(jobs, job{d.scratch[m : m+n], pieces[0][:n], sec + int64(m)/ss})
			if pieces[0] = pieces[0][n:]; len(pieces[0]) == 0 {
				pieces = pieces[1:]
			}
			m += n
		}
		errs = append(errs[:0], make([]error, len(jobs))...) // no allocation once grown
		do := func(i int) { errs[i] = d.crypt(jobs[i].dst, jobs[i].src, jobs[i].sec, false) }
		if workers := min(runtime.GOMAXPROCS(0), len(jobs)); workers > 1 && m >= gatherParallel {
			var next atomic.Int64
			work := func() {
				for i := int(next.Add(1) - 1); i < len(jobs); i = int(next.Add(1) - 1) {
					do(i)
				}
			}
			var wg sync.WaitGroup
			for range workers - 1 {
				wg.Go(work)
			}
			work()
			wg.Wait()
		} else {
			for i := range jobs {
				do(i)
			}
		}
		for _, err := range errs {
			if err != nil {
				clear(d.scratch[:m])
				return fmt.Errorf("write sectors %d+%d: %w", sec, m/d.ss, err)
			}
		}
		err := d.writeFile(d.scratch[:m], d.off+sec*ss)
		if d.g == nil {
			clear(d.scratch[:m]) // plaintext
		}
		if err != nil {
			return fmt.Errorf("write sectors %d+%d: %w", sec, m/d.ss, err)
		}
		d.startWriteback(d.off+sec*ss, int64(m))
		sec += int64(m) / ss
	}
	return nil
}

// startWriteback asks the kernel to start writing n bytes of the file at
// off to the disk now, without waiting for them: a flush writes a run's
// chunks and then fsyncs, and the disk writing each chunk while the next
// one is encrypted leaves the fsync less to wait for. It orders nothing
// and promises nothing (the fsync still does both), so a failure is only
// lost speed and is not reported.
func (d *Device) startWriteback(off, n int64) {
	rc, err := d.f.SyscallConn()
	if err != nil {
		return
	}
	_ = rc.Control(func(fd uintptr) {
		_ = unix.SyncFileRange(int(fd), off, n, unix.SYNC_FILE_RANGE_WRITE)
	})
}
