#!/bin/sh
# bench_monitor.sh: what the eBPF monitor (ebpfmon) costs and how fast it
# alerts, on this machine. Needs root (it loads BPF programs).
#
# Overhead: open/close-heavy, relative-open and dd-style read/write
# microbenchmarks, and a realistic open-heavy one (read a tree of 4000 small
# files, as tar or grep -r does: open, fstat, read, close), each timed
# (thread CPU time) with and without the monitor in the same run, in
# alternating rounds. Per workload it reports the median of the per-round
# ratios with its middle half, and the ratio of the fastest 200-op blocks
# with and without (other load only adds time, so these are the closest to
# the monitor's own cost), against the target ratio <= 1.02; the same
# for a floor: an empty program (it returns at once) on each tracepoint the
# monitor uses, timed in the same rounds, which is what the kernel charges
# for the hooks themselves whatever a program does; and the kernel's own
# count of the openat program's run time per open, which the machine's
# other load does not blur.
# Latency: CLOCK_MONOTONIC just before an attacking open to the event's
# arrival in user space, p50 and p99 over KEYGATE_BENCH_ALERTS alerts.
# Target: p99 <= 5 ms.
#
# Sizes: KEYGATE_BENCH_OPS (operations per round, default 30000),
# KEYGATE_BENCH_ROUNDS (default 15: many short rounds let drift cancel),
# KEYGATE_BENCH_ALERTS (default 2000).
set -eu
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
	echo "bench_monitor.sh: needs root to load BPF programs; run it with sudo" >&2
	exit 1
fi
: "${GO:=go}"
: "${KEYGATE_BENCH_OPS:=30000}"
: "${KEYGATE_BENCH_ROUNDS:=15}"
: "${KEYGATE_BENCH_ALERTS:=2000}"
export KEYGATE_BENCH_OPS KEYGATE_BENCH_ROUNDS KEYGATE_BENCH_ALERTS
echo "== ebpfmon: overhead and alert latency (ops $KEYGATE_BENCH_OPS x $KEYGATE_BENCH_ROUNDS rounds, $KEYGATE_BENCH_ALERTS alerts)"
out=$($GO test -count=1 -run '^$' -bench 'BenchmarkOverhead|BenchmarkAlertLatency' -benchtime 1x -v ./ebpfmon/ 2>&1) || {
	echo "$out" >&2
	exit 1
}
if echo "$out" | grep -q -- '--- SKIP'; then
	echo "$out" | grep -A1 -- '--- SKIP' >&2
	exit 1
fi
echo "$out" | grep -E 'bench_test.go' | sed 's/^ *bench_test.go:[0-9]*: /  /'
