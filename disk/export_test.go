package disk

// CutWritesAfter makes d write only n more sectors to its file, as if the
// process were killed then; every later write and Sync fails.
func CutWritesAfter(d *Device, n int64) { d.cut = &writeCut{budget: n} }

// SectorsWritten is how many sectors d wrote to its file since
// CutWritesAfter.
func SectorsWritten(d *Device) int64 { return d.cut.written }

// FlushCounts says how many flushes of open files went in place on ext4,
// and how many fell back to storing the whole file.
func FlushCounts(f *FS) (inPlace, whole int) { return f.inPlace, f.whole }

// WaitWriteBack waits until the writeback in flight on f, if any, has
// written and synced its epoch B, without completing the flush as the
// next operation on f will.
func WaitWriteBack(f *FS) {
	f.mu.Lock()
	pf := f.pending
	f.mu.Unlock()
	if pf != nil {
		<-pf.done
	}
}

// OnWriteBack makes each writeback's goroutine call fn with the pages it
// writes, before it writes them (done false) and once they are written
// and synced (done true), until the test ends.
func OnWriteBack(t interface{ Cleanup(func()) }, fn func(pages [][]byte, done bool)) {
	writeBackHook = func(pages []dataPage, done bool) {
		pgs := make([][]byte, len(pages))
		for i, p := range pages {
			pgs[i] = p.pg
		}
		fn(pgs, done)
	}
	t.Cleanup(func() { writeBackHook = nil })
}

// FailNextSync makes the next fdatasync of d's file (by d, or by the
// image's Blocks) that succeeds report err instead, as the kernel reports a writeback error to one fdatasync
// and clears it: the one place a test can produce it without a failing
// disk (device-mapper's error target is not on every test machine).
func FailNextSync(d *Device, err error) {
	f := d.faults
	f.mu.Lock()
	defer f.mu.Unlock()
	f.next = append(f.next, err)
}
