#!/bin/sh
# bench_monitor_guest.sh: what the monitor costs in the test VM's kernel
# (Debian 6.1 booted with lsm=...,bpf, under QEMU TCG), where deny mode
# reports everything from its BPF LSM programs, attaches no syscall
# tracepoint and hooks nothing every open passes. A static C probe
# (guestbench/bench.c: open+close, read+write 4 KiB, getppid; the fastest
# 200-op block of thread CPU time) runs without the monitor, with
# `keygate monitor --detect-only` (the open tracepoints and the int 0x80
# hook) and with `keygate monitor` (deny mode), in alternating rounds
# (guestbench/guest.sh). Needs what `make testvm` needs; about 2 minutes.
set -eu
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
gcc -O2 -static -o "$tmp/bench" scripts/guestbench/bench.c
go run ./testvm/cmd/kgvm -script scripts/guestbench/guest.sh -fwcfg bench="$tmp/bench" -timeout 14m | tee "$tmp/log" >&2
grep '^bench' "$tmp/log" | awk '{k=$3" "$2; if(!(k in m)||$4<m[k])m[k]=$4} END{for(k in m)print k, m[k] " ns/op"}' | sort
