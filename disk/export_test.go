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
