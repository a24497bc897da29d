package ebpfmon_test

import (
	"context"
	"os"
	"runtime"
	"slices"
	"strconv"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/keygate/keygate/ebpfmon"
)

// workloads are what the overhead benchmark times, each op a few syscalls:
// opens and closes by absolute path (the monitor reads each path's first
// bytes), relative to a directory fd (it checks the directory's filesystem),
// and dd-style reads and writes (which it does not trace at all, but which
// pay for syscall tracepoints being on).
var workloads = []struct {
	name string
	op   func(b *testing.B, dir int, buf []byte)
}{
	{"open-close", func(b *testing.B, _ int, _ []byte) {
		fd, err := unix.Open("/etc/hostname", unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			b.Fatal(err)
		}
		unix.Close(fd)
	}},
	{"openat-relative", func(b *testing.B, dir int, _ []byte) {
		fd, err := unix.Openat(dir, "hostname", unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			b.Fatal(err)
		}
		unix.Close(fd)
	}},
	{"read-write-4k", func(b *testing.B, _ int, buf []byte) {
		unix.Read(zeroFD, buf)
		unix.Write(nullFD, buf)
	}},
}

var zeroFD, nullFD int

// BenchmarkOverhead times each workload with and without the monitor in
// the same run, alternating rounds so that drift in the machine's load
// affects both, and reports the median ratio (with/without) per workload.
// Run it with -benchtime 1x; KEYGATE_BENCH_OPS and KEYGATE_BENCH_ROUNDS set
// the size.
func BenchmarkOverhead(b *testing.B) {
	ops := envInt("KEYGATE_BENCH_OPS", 200000)
	rounds := envInt("KEYGATE_BENCH_ROUNDS", 5)
	var err error
	if zeroFD, err = unix.Open("/dev/zero", unix.O_RDONLY, 0); err != nil {
		b.Fatal(err)
	}
	if nullFD, err = unix.Open("/dev/null", unix.O_WRONLY, 0); err != nil {
		b.Fatal(err)
	}
	dir, err := unix.Open("/etc", unix.O_RDONLY|unix.O_DIRECTORY, 0)
	if err != nil {
		b.Fatal(err)
	}
	v := startVictim(b)
	buf := make([]byte, 4096)
	// CPU time of this thread, not wall time: on a shared machine other
	// processes' load would swamp a difference of a few percent.
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	ratios := make([][]float64, len(workloads))
	offNS := make([][]float64, len(workloads))
	for r := 0; r < rounds; r++ {
		var ns [2][]float64
		// Alternate the order (off-on, on-off) so that drift cancels.
		order := []bool{false, true}
		if r%2 == 1 {
			order = []bool{true, false}
		}
		for _, on := range order {
			var m *ebpfmon.Monitor
			if on {
				m = startMonitor(b, ebpfmon.Config{})
				if err := m.Protect(v.PID, []ebpfmon.Range{v.Key}); err != nil {
					b.Fatal(err)
				}
			}
			idx := 0
			if on {
				idx = 1
			}
			for _, w := range workloads {
				w.op(b, dir, buf) // warm
				start := threadCPU()
				for n := 0; n < ops; n++ {
					w.op(b, dir, buf)
				}
				ns[idx] = append(ns[idx], float64(threadCPU()-start)/float64(ops))
			}
			if m != nil {
				m.Close()
			}
		}
		for i := range workloads {
			offNS[i] = append(offNS[i], ns[0][i])
			ratios[i] = append(ratios[i], ns[1][i]/ns[0][i])
		}
	}
	// The programs' own cost, counted by the kernel: exact where the
	// ratios above are at the mercy of the machine's other load.
	stats, err := ebpfmon.EnableStats()
	if err != nil {
		b.Fatal(err)
	}
	m := startMonitor(b, ebpfmon.Config{})
	if err := m.Protect(v.PID, []ebpfmon.Range{v.Key}); err != nil {
		b.Fatal(err)
	}
	for _, w := range workloads[:2] {
		before, err := m.ProgramStats()
		if err != nil {
			b.Fatal(err)
		}
		for n := 0; n < ops; n++ {
			w.op(b, dir, buf)
		}
		after, _ := m.ProgramStats()
		var runs uint64
		var rt time.Duration
		for _, name := range []string{"sys_enter_openat", "sys_exit_openat"} {
			r, d := after[name].Runs-before[name].Runs, after[name].Runtime-before[name].Runtime
			runs += r
			rt += d
			b.Logf("%s: %s ran %d times, %.0f ns a run", w.name, name, r, float64(d.Nanoseconds())/float64(r))
		}
		// Other processes open files too; the per-run cost is what counts.
		perRun := float64(rt.Nanoseconds()) / float64(runs)
		b.ReportMetric(perRun*2, w.name+"-bpf-ns/op")
		b.Logf("%s: the openat programs ran %d times, %.0f ns a run: %.0f ns of BPF per open+close", w.name, runs, perRun, perRun*2)
	}
	m.Close()
	stats.Close()
	for i, w := range workloads {
		slices.Sort(ratios[i])
		slices.Sort(offNS[i])
		med := ratios[i][len(ratios[i])/2]
		b.ReportMetric(offNS[i][len(offNS[i])/2], w.name+"-ns/op")
		b.ReportMetric(med, w.name+"-ratio")
		b.Logf("%s: %.0f ns/op without the monitor; with it, median ratio %.4f (%+.2f%%), per round %v",
			w.name, offNS[i][len(offNS[i])/2], med, (med-1)*100, ratios[i])
	}
}

// BenchmarkAlertLatency opens /proc/<victim>/environ again and again and
// measures, for each open, CLOCK_MONOTONIC just before the syscall to the
// event's arrival in user space; it reports p50 and p99.
func BenchmarkAlertLatency(b *testing.B) {
	n := envInt("KEYGATE_BENCH_ALERTS", 2000)
	m := startMonitor(b, ebpfmon.Config{})
	v := startVictim(b)
	if err := m.Protect(v.PID, []ebpfmon.Range{v.Key}); err != nil {
		b.Fatal(err)
	}
	path := "/proc/" + strconv.Itoa(v.PID) + "/environ"
	lat := make([]float64, 0, n)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	for i := 0; i < n; i++ {
		t0 := ebpfmon.MonotonicNow()
		fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			b.Fatal(err)
		}
		unix.Close(fd)
		select {
		case e := <-m.Events():
			if e.TGID != os.Getpid() || e.Technique != ebpfmon.ProcEnviron {
				b.Fatalf("unexpected event %v", e)
			}
			lat = append(lat, float64(e.ReceivedNS-t0)/1e3)
		case <-ctx.Done():
			b.Fatal("no event within a minute")
		}
	}
	slices.Sort(lat)
	st, _ := m.Stats()
	b.ReportMetric(lat[len(lat)/2], "p50-µs")
	b.ReportMetric(lat[len(lat)*99/100], "p99-µs")
	b.ReportMetric(lat[len(lat)-1], "max-µs")
	b.ReportMetric(float64(st.Drops), "drops")
	b.Logf("alert latency over %d alerts: p50 %.0f µs, p99 %.0f µs, max %.0f µs; %d dropped", n, lat[len(lat)/2], lat[len(lat)*99/100], lat[len(lat)-1], st.Drops)
}

func threadCPU() int64 {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_THREAD_CPUTIME_ID, &ts); err != nil {
		panic(err)
	}
	return ts.Nano()
}

func envInt(name string, def int) int {
	if n, err := strconv.Atoi(os.Getenv(name)); err == nil && n > 0 {
		return n
	}
	return def
}
