package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"slices"
	"sync"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/spf13/cobra"
	"golang.org/x/sys/unix"

	"github.com/keygate/keygate/ebpfmon"
	"github.com/keygate/keygate/internal/cli"
)

type monitorFlags struct {
	pid        int
	asJSON     bool
	output     string
	ranges     string
	detectOnly bool
	allow      []int
	metrics    string
	minSev     string
}

func newMonitorCmd() *cobra.Command {
	var f monitorFlags
	c := &cobra.Command{
		Use:   "monitor --pid PID",
		Short: "Watch a key-holding process for other processes reading its memory",
		Long: `Load the eBPF monitor, protect PID, and report every attempt by another
process to reach its memory: process_vm_readv/writev, ptrace attach, seize,
peek and poke, opens of /proc/PID/mem (any path form), environ and maps,
pidfd_getfd, perf_event_open on PID, and opens of /proc/kcore and /dev/mem;
in detect mode also descriptors of the monitor's own BPF objects taken by
ID (bpf_fd) and loads of tracing BPF programs (bpf_prog_load). Events the
kernel dropped (ring buffer full) are reported as a critical events_lost.
Needs root. The monitor protects its own process too.

The first line on stderr says the mode in force: "deny" where the BPF LSM is
active and its programs loaded (attempts are then refused), else "detect",
with the reason.

--ranges names the key pages, one hex range per line, as in /proc/PID/maps:
  7f3a1c000000-7f3a1c001000     add a range (a leading + is the same)
  -7f3a1c000000-7f3a1c001000    remove it again
  # comments and blank lines are ignored
With --ranges - the lines are read from stdin as they come, so the key holder
can stream updates. Without --ranges, or while no range is registered, the
whole address space counts as key pages.

Events below --min-severity (warning by default) are counted, not printed:
ps reads every process's environ, each an info event. --min-severity info
prints them all.

The monitor runs until PID exits or it is interrupted (SIGINT, SIGTERM). It
stops with an error if the kernel's ring buffer keeps failing to read.`,
		Args: cobra.NoArgs,
		RunE: func(c *cobra.Command, _ []string) error { return runMonitor(c, f) },
	}
	fl := c.Flags()
	fl.IntVar(&f.pid, "pid", 0, "process to protect (required)")
	fl.BoolVar(&f.asJSON, "json", false, "print events as JSON lines on stdout")
	fl.StringVar(&f.output, "output", "", "also append events as JSON lines to this file")
	fl.StringVar(&f.ranges, "ranges", "", "file of key ranges, or - for stdin (default: the whole address space)")
	fl.BoolVar(&f.detectOnly, "detect-only", false, "report only, even where the BPF LSM could deny")
	fl.IntSliceVar(&f.allow, "allow", nil, "pid the BPF LSM lets through (still reported); repeatable")
	fl.StringVar(&f.minSev, "min-severity", string(ebpfmon.Warning), "lowest severity printed and written: info, warning or critical (every event is counted in --metrics)")
	fl.StringVar(&f.metrics, "metrics", "", "serve Prometheus metrics on this address (e.g. 127.0.0.1:9464)")
	return c
}

func runMonitor(c *cobra.Command, f monitorFlags) error {
	if f.pid <= 0 {
		return cli.Usagef(c, "--pid is required: the process id to protect")
	}
	if f.pid == os.Getpid() {
		return cli.Usagef(c, "--pid %d is this monitor; it protects itself already", f.pid)
	}
	pidfd, err := unix.PidfdOpen(f.pid, 0)
	if err != nil {
		return fmt.Errorf("--pid %d: %v (is the process running?)", f.pid, err)
	}
	defer unix.Close(pidfd)

	minSev, err := ebpfmon.ParseSeverity(f.minSev)
	if err != nil {
		return cli.Usagef(c, "--min-severity: %v", err)
	}

	var rangeFile io.Reader
	if f.ranges != "" && f.ranges != "-" {
		rf, err := os.Open(f.ranges)
		if err != nil {
			return fmt.Errorf("--ranges: %v", err)
		}
		defer rf.Close()
		rangeFile = rf
	}

	var sinks []ebpfmon.Sink
	stdout := c.OutOrStdout()
	if f.asJSON {
		sinks = append(sinks, ebpfmon.NewJSONSink(stdout))
	} else {
		sinks = append(sinks, ebpfmon.SinkFunc(func(e ebpfmon.Event) error {
			_, err := fmt.Fprintf(stdout, "%s %s\n", e.Time.UTC().Format(time.RFC3339Nano), e)
			return err
		}))
	}
	if f.output != "" {
		of, err := os.OpenFile(f.output, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
		if err != nil {
			return fmt.Errorf("--output: %v", err)
		}
		defer of.Close()
		sinks = append(sinks, ebpfmon.NewJSONSink(of))
	}
	var ln net.Listener
	if f.metrics != "" {
		if ln, err = net.Listen("tcp", f.metrics); err != nil {
			return fmt.Errorf("--metrics: %v", err)
		}
		defer ln.Close()
	}

	ctx, stop := signal.NotifyContext(c.Context(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)

	m, err := ebpfmon.Start(ctx, ebpfmon.Config{DetectOnly: f.detectOnly, Allow: f.allow, MinSeverity: minSev})
	if err != nil {
		return err
	}
	defer m.Close()
	p := &rangeSet{m: m, pid: f.pid, n: map[ebpfmon.Range]int{}}
	if rangeFile != nil {
		// A file is read whole before monitoring is announced, so that no
		// event is graded against the provisional whole-address-space set.
		if err := ebpfmon.ReadRanges(rangeFile, p.update); err != nil {
			return fmt.Errorf("--ranges %s: %w", f.ranges, err)
		}
	}
	if err := p.apply(); err != nil {
		return err
	}
	if ln != nil {
		reg := prometheus.NewRegistry()
		mt, err := ebpfmon.NewMetrics(reg, m)
		if err != nil {
			return err
		}
		sinks = append(sinks, mt)
		srv := &http.Server{Handler: promhttp.HandlerFor(reg, promhttp.HandlerOpts{}), ReadHeaderTimeout: 10 * time.Second}
		go srv.Serve(ln)
		defer srv.Close()
	}
	mode, why := m.Mode()
	fmt.Fprintf(c.ErrOrStderr(), "keygate monitor: protecting pid %d; mode %s: %s\n", f.pid, mode, why)

	if f.ranges == "-" {
		go func() {
			if err := ebpfmon.ReadRanges(c.InOrStdin(), p.update); err != nil {
				cancel(fmt.Errorf("--ranges -: %w", err))
			}
		}()
	}
	go func() {
		// The pidfd turns readable when the process exits.
		fds := []unix.PollFd{{Fd: int32(pidfd), Events: unix.POLLIN}}
		for ctx.Err() == nil {
			if n, err := unix.Poll(fds, 500); err == nil && n > 0 {
				cancel(errTargetExited)
				return
			}
		}
	}()
	ebpfmon.Dispatch(ctx, m.Events(), func(_ ebpfmon.Sink, err error) {
		fmt.Fprintf(c.ErrOrStderr(), "keygate monitor: %v\n", err)
	}, sinks...)

	st, serr := m.Stats()
	if serr == nil && st.Drops > 0 {
		fmt.Fprintf(c.ErrOrStderr(), "keygate monitor: %d events were dropped (the ring buffer was full)\n", st.Drops)
	}
	if st.ReadErrors+st.DecodeErrors > 0 {
		fmt.Fprintf(c.ErrOrStderr(), "keygate monitor: %d ring buffer reads failed and %d records did not decode; events may be lost\n", st.ReadErrors, st.DecodeErrors)
	}
	if err := m.Err(); err != nil {
		return fmt.Errorf("monitor stopped: %w", err)
	}
	switch cause := context.Cause(ctx); {
	case errors.Is(cause, errTargetExited):
		fmt.Fprintf(c.ErrOrStderr(), "keygate monitor: pid %d exited\n", f.pid)
		return nil
	case errors.Is(cause, context.Canceled), cause == nil:
		return nil
	default:
		return cause
	}
}

var errTargetExited = errors.New("target exited")

// rangeSet counts the ranges --ranges has added (a range added twice must be
// removed twice) and keeps the monitor's copy in step.
type rangeSet struct {
	mu  sync.Mutex
	m   *ebpfmon.Monitor
	pid int
	n   map[ebpfmon.Range]int
}

func (p *rangeSet) update(u ebpfmon.RangeUpdate) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if u.Remove {
		if p.n[u.Range] == 0 {
			return fmt.Errorf("remove %v: no such range was added", u.Range)
		}
		if p.n[u.Range]--; p.n[u.Range] == 0 {
			delete(p.n, u.Range)
		}
	} else {
		p.n[u.Range]++
	}
	return p.applyLocked()
}

func (p *rangeSet) apply() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.applyLocked()
}

func (p *rangeSet) applyLocked() error {
	rs := make([]ebpfmon.Range, 0, len(p.n))
	for r := range p.n {
		rs = append(rs, r)
	}
	slices.SortFunc(rs, func(a, b ebpfmon.Range) int {
		if a.Start < b.Start {
			return -1
		} else if a.Start > b.Start {
			return 1
		}
		return 0
	})
	return p.m.Protect(p.pid, rs)
}
