// Command workload is the test guest's storage workload (issue 11): a real
// SQLite (modernc.org/sqlite, pure Go, so it builds static) committing
// transactions on a mounted volume, the check that runs after a crash, and
// a small file I/O benchmark for comparing two mounts in one guest. The
// testvm tests build it with CGO_ENABLED=0 and put it in the initramfs as
// /bin/kg-workload; results go to stdout as "KEYGATE-RESULT key=value"
// lines, which the guest's console carries to the host.
//
//	kg-workload sqlite-run DB N    commit N transactions after the last one in DB
//	kg-workload sqlite-check DB    integrity_check, highest sequence, gaps
//	kg-workload io LABEL FILE MiB RANDOPS
//	kg-workload probe DIR          what SQLite needs of a filesystem
//
// sqlite-run opens DB in WAL mode with synchronous=FULL, so a COMMIT has
// returned only once its WAL frames are fsynced. Each transaction inserts
// one row (its sequence number, a payload derived from that number, and the
// payload's SHA-256) and records the number in a one-row table; right after
// COMMIT returns it prints "KEYGATE-RESULT sqlite_committed=SEQ". The host
// therefore knows a lower bound of what was acknowledged when it kills the
// guest, and after the reboot every number up to that bound must be there.
// With KG_SQLITE_NOLOCK set it opens DB without file locks (see open), for
// filesystems that refuse them.
package main

import (
	"crypto/rand"
	"crypto/sha256"
	"database/sql"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"maps"
	mrand "math/rand/v2"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
	_ "modernc.org/sqlite"
)

func main() {
	if len(os.Args) < 2 {
		usage()
	}
	var err error
	switch os.Args[1] {
	case "sqlite-run":
		if len(os.Args) != 4 {
			usage()
		}
		n, perr := strconv.Atoi(os.Args[3])
		if perr != nil || n <= 0 {
			usage()
		}
		err = sqliteRun(os.Args[2], n)
	case "sqlite-check":
		if len(os.Args) != 3 {
			usage()
		}
		err = sqliteCheck(os.Args[2])
	case "probe":
		if len(os.Args) != 3 {
			usage()
		}
		err = probe(os.Args[2])
	case "io":
		if len(os.Args) != 6 {
			usage()
		}
		mib, err1 := strconv.Atoi(os.Args[4])
		ops, err2 := strconv.Atoi(os.Args[5])
		if err1 != nil || err2 != nil || mib <= 0 || ops <= 0 {
			usage()
		}
		err = ioBench(os.Args[2], os.Args[3], mib, ops)
	default:
		usage()
	}
	if err != nil {
		// One line, so the host can read the whole reason from the result.
		result(os.Args[1]+"_error", strings.ReplaceAll(err.Error(), "\n", " "))
		os.Exit(1)
	}
}

func usage() {
	fmt.Fprintln(os.Stderr, "usage: kg-workload sqlite-run DB N | sqlite-check DB | io LABEL FILE MiB RANDOPS | probe DIR")
	os.Exit(2)
}

func result(key, value string) {
	// One write per line: the console must never hold half a result.
	os.Stdout.WriteString("KEYGATE-RESULT " + key + "=" + value + "\n")
}

// payloadSize makes each transaction write a few pages of WAL, as a small
// business record with an index would.
const payloadSize = 1000

// payload is the row content for seq: a pure function of seq, so the check
// can tell a row that is present but damaged.
func payload(seq int64) []byte {
	out := make([]byte, 0, payloadSize+sha256.Size)
	var b [8]byte
	binary.LittleEndian.PutUint64(b[:], uint64(seq))
	h := sha256.Sum256(b[:])
	for len(out) < payloadSize {
		out = append(out, h[:]...)
		h = sha256.Sum256(h[:])
	}
	return out[:payloadSize]
}

func sum(p []byte) string {
	s := sha256.Sum256(p)
	return hex.EncodeToString(s[:])
}

func open(path string) (*sql.DB, error) {
	dsn := "file:" + path + "?_pragma=journal_mode(WAL)&_pragma=synchronous(FULL)&_pragma=busy_timeout(10000)"
	if os.Getenv("KG_SQLITE_NOLOCK") != "" {
		// SQLite's unix-none VFS takes no file locks, and in exclusive
		// locking mode the WAL index lives in the heap, not in a shared
		// mapping of the -shm file: one process, no locks asked of the
		// filesystem. Only safe while no other process opens DB.
		dsn = "file:" + path + "?vfs=unix-none&_pragma=locking_mode(EXCLUSIVE)&_pragma=synchronous(FULL)"
	}
	db, err := sql.Open("sqlite", dsn)
	if err != nil {
		return nil, err
	}
	db.SetMaxOpenConns(1)
	var mode string
	if err := db.QueryRow("PRAGMA journal_mode=WAL").Scan(&mode); err != nil {
		db.Close()
		return nil, fmt.Errorf("open %s: %w", path, err)
	}
	if mode != "wal" {
		db.Close()
		return nil, fmt.Errorf("open %s: journal_mode is %q, want wal", path, mode)
	}
	var sync int
	if err := db.QueryRow("PRAGMA synchronous").Scan(&sync); err != nil || sync != 2 {
		db.Close()
		return nil, fmt.Errorf("open %s: synchronous is %d (%v), want 2 (FULL)", path, sync, err)
	}
	return db, nil
}

func sqliteRun(path string, n int) error {
	db, err := open(path)
	if err != nil {
		return err
	}
	defer db.Close()
	for _, s := range []string{
		"CREATE TABLE IF NOT EXISTS tx (seq INTEGER PRIMARY KEY, payload BLOB NOT NULL, sum TEXT NOT NULL)",
		"CREATE TABLE IF NOT EXISTS meta (id INTEGER PRIMARY KEY CHECK (id = 1), last INTEGER NOT NULL)",
		"INSERT OR IGNORE INTO meta VALUES (1, 0)",
	} {
		if _, err := db.Exec(s); err != nil {
			return fmt.Errorf("set up %s: %w", path, err)
		}
	}
	var last int64
	if err := db.QueryRow("SELECT last FROM meta").Scan(&last); err != nil {
		return fmt.Errorf("read the last sequence: %w", err)
	}
	result("sqlite_start", strconv.FormatInt(last, 10))
	start := time.Now()
	for i := 1; i <= n; i++ {
		seq := last + int64(i)
		p := payload(seq)
		tx, err := db.Begin()
		if err != nil {
			return fmt.Errorf("begin %d: %w", seq, err)
		}
		if _, err := tx.Exec("INSERT INTO tx VALUES (?, ?, ?)", seq, p, sum(p)); err != nil {
			tx.Rollback()
			return fmt.Errorf("insert %d: %w", seq, err)
		}
		if _, err := tx.Exec("UPDATE meta SET last = ?", seq); err != nil {
			tx.Rollback()
			return fmt.Errorf("update meta to %d: %w", seq, err)
		}
		if err := tx.Commit(); err != nil {
			return fmt.Errorf("commit %d: %w", seq, err)
		}
		result("sqlite_committed", strconv.FormatInt(seq, 10))
		if i%100 == 0 || i == n {
			secs := time.Since(start).Seconds()
			result("sqlite_rate", fmt.Sprintf("tx=%d secs=%.2f txps=%.1f", i, secs, float64(i)/secs))
		}
	}
	result("sqlite_run_done", strconv.Itoa(n))
	return nil
}

func sqliteCheck(path string) error {
	if _, err := os.Stat(path); err != nil {
		return err
	}
	db, err := open(path)
	if err != nil {
		return err
	}
	defer db.Close()
	var integrity []string
	rows, err := db.Query("PRAGMA integrity_check")
	if err != nil {
		return fmt.Errorf("integrity_check: %w", err)
	}
	for rows.Next() {
		var s string
		if err := rows.Scan(&s); err != nil {
			rows.Close()
			return err
		}
		integrity = append(integrity, s)
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return fmt.Errorf("integrity_check: %w", err)
	}
	result("sqlite_integrity", strings.Join(integrity, "; "))
	var last int64
	if err := db.QueryRow("SELECT last FROM meta").Scan(&last); err != nil {
		return fmt.Errorf("read meta: %w", err)
	}
	// Every row: the sequence numbers present, and each payload as written.
	rows, err = db.Query("SELECT seq, payload, sum FROM tx ORDER BY seq")
	if err != nil {
		return fmt.Errorf("read rows: %w", err)
	}
	var count, max, gaps, bad int64
	var prev int64
	for rows.Next() {
		var seq int64
		var p []byte
		var s string
		if err := rows.Scan(&seq, &p, &s); err != nil {
			rows.Close()
			return err
		}
		count++
		gaps += seq - prev - 1
		prev, max = seq, seq
		if want := payload(seq); string(p) != string(want) || s != sum(want) {
			bad++
		}
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return fmt.Errorf("read rows: %w", err)
	}
	// contiguous: every sequence 1..max is present, each row intact, and
	// the one-row table agrees (both were written in one transaction).
	result("sqlite_check", fmt.Sprintf("rows=%d max=%d missing=%d bad=%d meta_last=%d", count, max, gaps, bad, last))
	return nil
}

// ioBench writes FILE sequentially (mib MiB in 1 MiB writes, then fsync),
// drops the page cache, reads it back, then does ops random 4 KiB writes
// each followed by fdatasync, and ops random 4 KiB reads after another
// drop; it reports MiB/s and operations per second.
func ioBench(label, path string, mib, ops int) error {
	buf := make([]byte, 1<<20)
	if _, err := rand.Read(buf); err != nil {
		return err
	}
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return err
	}
	defer f.Close()
	st := phaseStats{label: label}
	st.start("seqwrite")
	t := time.Now()
	for i := 0; i < mib; i++ {
		buf[0] = byte(i)
		if _, err := f.Write(buf); err != nil {
			return fmt.Errorf("write: %w", err)
		}
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("fsync: %w", err)
	}
	seqW := float64(mib) / time.Since(t).Seconds()
	st.phase("seqwrite", mib)
	if err := dropCaches(); err != nil {
		return err
	}
	st.start("seqread")
	t = time.Now()
	if _, err := f.Seek(0, io.SeekStart); err != nil {
		return err
	}
	n, err := io.CopyBuffer(io.Discard, struct{ io.Reader }{f}, buf)
	if err != nil {
		return fmt.Errorf("read: %w", err)
	}
	if n != int64(mib)<<20 {
		return fmt.Errorf("read %d bytes back, wrote %d", n, int64(mib)<<20)
	}
	seqR := float64(mib) / time.Since(t).Seconds()
	st.phase("seqread", mib)
	rng := mrand.New(mrand.NewPCG(1, 2))
	blocks := int64(mib) << 20 / 4096
	page := buf[:4096]
	st.start("randwrite")
	t = time.Now()
	for i := 0; i < ops; i++ {
		if _, err := f.WriteAt(page, rng.Int64N(blocks)*4096); err != nil {
			return fmt.Errorf("random write: %w", err)
		}
		if err := f.Sync(); err != nil {
			return fmt.Errorf("fsync: %w", err)
		}
	}
	randW := float64(ops) / time.Since(t).Seconds()
	st.phase("randwrite", ops)
	if err := dropCaches(); err != nil {
		return err
	}
	st.start("randread")
	t = time.Now()
	for i := 0; i < ops; i++ {
		if _, err := f.ReadAt(page, rng.Int64N(blocks)*4096); err != nil {
			return fmt.Errorf("random read: %w", err)
		}
	}
	randR := float64(ops) / time.Since(t).Seconds()
	st.phase("randread", ops)
	result("iocost_"+label, strings.Join(st.out, " "))
	result("io_"+label, fmt.Sprintf("seqwrite_mibs=%.2f seqread_mibs=%.2f randwrite_iops=%.1f randread_iops=%.1f mib=%d ops=%d", seqW, seqR, randW, randR, mib, ops))
	return nil
}

// phaseStats measures what a benchmark phase cost the guest, per unit (a
// MiB or an operation): context switches, the vCPU time spent outside idle
// and iowait (from /proc/stat), and what any keygate process took: CPU
// time, voluntary context switches of its threads, and how many of its
// threads ran. The busy fraction tells whether the one vCPU or the wait
// for the virtual disk bounds a phase.
//
// With KG_PERF_PHASES naming phases (comma-separated), each of them also
// runs under `perf record -a -g` (the host's perf, through /bin/ld.so; see
// testvm's KEYGATE_TESTVM_PERF), written to /tmp/perf.LABEL.PHASE: where
// the vCPU's time went, kernel and user space alike.
type phaseStats struct {
	label string
	at    sysSample
	out   []string
	perf  *exec.Cmd
}

type sysSample struct {
	ctxt, busy, total, kg, kgSys, kgVcsw uint64
	kgThreads                            map[string]uint64 // CPU ticks by thread id
	kgThreadVcsw                         map[string]uint64 // voluntary switches by thread id
	// dev holds each block device's completed requests and sectors
	// (/sys/block/*/stat): how the phase's I/O reached the devices.
	dev map[string]devSample
}

type devSample struct{ reqs, sectors uint64 }

func (s *phaseStats) start(name string) {
	s.perf = nil
	if slices.Contains(strings.Split(os.Getenv("KG_PERF_PHASES"), ","), name) {
		cmd := exec.Command("/bin/ld.so", "--library-path", "/lib/cs", "/bin/perf", "record", "-a", "-g", "-F", "997", "-q",
			"-o", "/tmp/perf."+s.label+"."+name)
		cmd.Stderr = os.Stderr
		if err := cmd.Start(); err != nil {
			result("perf_error", err.Error())
		} else {
			s.perf = cmd
			time.Sleep(3 * time.Second) // perf's start-up, slow under TCG
		}
	}
	s.at = sysStat()
}

// phase records the phase since start, over n units.
func (s *phaseStats) phase(name string, n int) {
	now := sysStat()
	if s.perf != nil {
		s.perf.Process.Signal(os.Interrupt)
		s.perf.Wait()
	}
	dt := now.total - s.at.total
	frac := 0.0
	if dt > 0 {
		frac = float64(now.busy-s.at.busy) / float64(dt)
	}
	ran := 0
	for id, ticks := range now.kgThreads {
		if ticks > s.at.kgThreads[id] {
			ran++
		}
	}
	per := func(d uint64) float64 { return float64(d) / float64(n) }
	// Clock ticks are USER_HZ (100 per second): 10 ms each.
	s.out = append(s.out, fmt.Sprintf("%[1]s_ctxt=%.1[2]f %[1]s_busy=%.2[3]f %[1]s_cpu_us=%.0[4]f %[1]s_kg_us=%.0[5]f %[1]s_kg_sys_us=%.0[8]f %[1]s_kg_vcsw=%.1[6]f %[1]s_kg_threads_ran=%[7]d",
		name, per(now.ctxt-s.at.ctxt), frac, per(now.busy-s.at.busy)*1e4, per(now.kg-s.at.kg)*1e4, per(now.kgVcsw-s.at.kgVcsw), ran, per(now.kgSys-s.at.kgSys)*1e4))
	// The keygate thread that switched most, and its place among the
	// process's threads by id (2: the second thread, which a Go program
	// starts first, for the runtime's monitor, sysmon).
	var top uint64
	topRank := 0
	ids := slices.SortedFunc(maps.Keys(now.kgThreadVcsw), func(a, b string) int {
		na, _ := strconv.Atoi(a[strings.IndexByte(a, '/')+1:])
		nb, _ := strconv.Atoi(b[strings.IndexByte(b, '/')+1:])
		return na - nb
	})
	for i, id := range ids {
		if d := now.kgThreadVcsw[id] - s.at.kgThreadVcsw[id]; d > top {
			top, topRank = d, i+1
		}
	}
	if top > 0 {
		s.out = append(s.out, fmt.Sprintf("%[1]s_kg_vcsw_top=%.1[2]f %[1]s_kg_vcsw_top_thread=%[3]d", name, per(top), topRank))
	}
	// Requests per unit and their mean size in KiB, for each device the
	// phase used: the size the kernel sends keygate (nbd0) and what
	// keygate's reads make of it (vda).
	for _, d := range slices.Sorted(maps.Keys(now.dev)) {
		reqs, sectors := now.dev[d].reqs-s.at.dev[d].reqs, now.dev[d].sectors-s.at.dev[d].sectors
		if reqs > 0 {
			s.out = append(s.out, fmt.Sprintf("%s_%s_reqs=%.1f %s_%s_kib=%.0f", name, d, per(reqs), name, d, float64(sectors)/2/float64(reqs)))
		}
	}
}

// sysStat reads the context switches and the busy and total CPU ticks from
// /proc/stat, and the ticks and voluntary switches of every thread of
// processes named keygate. Unreadable fields count as zero: the figures
// are a diagnosis, not a result.
func sysStat() sysSample {
	x := sysSample{kgThreads: map[string]uint64{}, kgThreadVcsw: map[string]uint64{}, dev: map[string]devSample{}}
	blocks, _ := os.ReadDir("/sys/block")
	for _, e := range blocks {
		b, _ := os.ReadFile("/sys/block/" + e.Name() + "/stat")
		// Read requests, merges, sectors, ticks; then the same for writes.
		if f := strings.Fields(string(b)); len(f) >= 7 {
			var n [7]uint64
			for i := range n {
				n[i], _ = strconv.ParseUint(f[i], 10, 64)
			}
			x.dev[e.Name()] = devSample{reqs: n[0] + n[4], sectors: n[2] + n[6]}
		}
	}
	b, _ := os.ReadFile("/proc/stat")
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		switch {
		case len(f) > 5 && f[0] == "cpu":
			// user nice system idle iowait irq softirq steal; guest
			// time is already counted in user.
			for i, v := range f[1:min(len(f), 9)] {
				n, _ := strconv.ParseUint(v, 10, 64)
				x.total += n
				if i != 3 && i != 4 { // idle, iowait
					x.busy += n
				}
			}
		case len(f) == 2 && f[0] == "ctxt":
			x.ctxt, _ = strconv.ParseUint(f[1], 10, 64)
		}
	}
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		if c, err := os.ReadFile("/proc/" + e.Name() + "/comm"); err != nil || strings.TrimSpace(string(c)) != "keygate" {
			continue
		}
		tasks, _ := os.ReadDir("/proc/" + e.Name() + "/task")
		for _, tk := range tasks {
			dir := "/proc/" + e.Name() + "/task/" + tk.Name()
			st, _ := os.ReadFile(dir + "/stat")
			// Fields after the command's closing parenthesis: utime is
			// the 12th, stime the 13th.
			if i := strings.LastIndexByte(string(st), ')'); i >= 0 {
				if f := strings.Fields(string(st[i+1:])); len(f) > 12 {
					u, _ := strconv.ParseUint(f[11], 10, 64)
					k, _ := strconv.ParseUint(f[12], 10, 64)
					x.kg += u + k
					x.kgSys += k
					x.kgThreads[e.Name()+"/"+tk.Name()] = u + k
				}
			}
			status, _ := os.ReadFile(dir + "/status")
			for _, line := range strings.Split(string(status), "\n") {
				if v, ok := strings.CutPrefix(line, "voluntary_ctxt_switches:"); ok {
					n, _ := strconv.ParseUint(strings.TrimSpace(v), 10, 64)
					x.kgVcsw += n
					x.kgThreadVcsw[e.Name()+"/"+tk.Name()] = n
				}
			}
		}
	}
	return x
}

func dropCaches() error {
	if err := os.WriteFile("/proc/sys/vm/drop_caches", []byte("3"), 0); err != nil {
		if errors.Is(err, os.ErrPermission) {
			return fmt.Errorf("drop caches: %w (run as root)", err)
		}
		return fmt.Errorf("drop caches: %w", err)
	}
	return nil
}

// probe tries, on a new file in dir, what SQLite's unix VFS asks of a
// filesystem in WAL mode, and reports what the kernel answered: fcntl
// record locks (F_SETLK read and write: every transaction; F_GETLK: the
// first open of the -shm wal-index), flock (not used by SQLite's default
// VFS; for comparison) and a shared writable mmap (the -shm wal-index).
func probe(dir string) error {
	path := dir + "/.kg-probe"
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return err
	}
	defer os.Remove(path)
	defer f.Close()
	if _, err := f.Write(make([]byte, 32768)); err != nil {
		return err
	}
	fd := int(f.Fd())
	// The byte SQLite takes a SHARED lock through (PENDING_BYTE), then the
	// write lock of RESERVED, then the F_GETLK that opening a WAL
	// database's -shm file starts with (unixLockSharedMemory).
	lk := unix.Flock_t{Type: unix.F_RDLCK, Whence: 0, Start: 1 << 30, Len: 1}
	r := []string{"fcntl_setlk=" + errnoName(unix.FcntlFlock(uintptr(fd), unix.F_SETLK, &lk))}
	lk = unix.Flock_t{Type: unix.F_WRLCK, Whence: 0, Start: 1<<30 + 1, Len: 1}
	r = append(r, "fcntl_setlk_wr="+errnoName(unix.FcntlFlock(uintptr(fd), unix.F_SETLK, &lk)))
	lk = unix.Flock_t{Type: unix.F_UNLCK, Whence: 0, Start: 1 << 30, Len: 2}
	unix.FcntlFlock(uintptr(fd), unix.F_SETLK, &lk)
	lk = unix.Flock_t{Type: unix.F_WRLCK, Whence: 0, Start: 128, Len: 1}
	r = append(r, "fcntl_getlk="+errnoName(unix.FcntlFlock(uintptr(fd), unix.F_GETLK, &lk)))
	r = append(r, "flock="+errnoName(unix.Flock(fd, unix.LOCK_SH|unix.LOCK_NB)))
	unix.Flock(fd, unix.LOCK_UN)
	m, err := unix.Mmap(fd, 0, 32768, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err == nil {
		unix.Munmap(m)
	}
	r = append(r, "mmap_shared_rw="+errnoName(err))
	result("probe", strings.Join(r, " "))
	return nil
}

func errnoName(err error) string {
	if err == nil {
		return "ok"
	}
	var e syscall.Errno
	if errors.As(err, &e) {
		if n := unix.ErrnoName(e); n != "" {
			return n
		}
	}
	return strings.ReplaceAll(err.Error(), " ", "_")
}
