#!/usr/bin/env bash
# The 9P export's figures, each next to a reference measured in the same
# run (make bench calls this; it also runs alone). Commits are a 4 KiB
# write at a random offset plus fsync; the big file is 256 MiB written with
# one fsync at the end, then read.
set -euo pipefail
cd "$(dirname "$0")/.."
GO=${GO:-go}
out=$(mktemp)
trap 'rm -f "$out"' EXIT
$GO test -run '^$' -bench '^BenchmarkCommit$' -benchtime 300x -timeout 20m ./disk/ninep >"$out"
$GO test -run '^$' -bench '^BenchmarkBigFile$' -benchtime 3x -timeout 20m ./disk/ninep >>"$out"
metric() { awk -v n="$1" -v u="$2" '$1 == n || $1 ~ "^"n"-[0-9]+$" {for (i = 1; i <= NF; i++) if ($(i+1) == u) print $i}' "$out" | tail -1; }
echo "== 9P export of an encrypted ext4 volume (Go client, msize 512 KiB), against plain files in the same run =="
c1=$(metric BenchmarkCommit/9p/1M ns/op)
c64=$(metric BenchmarkCommit/9p/64M ns/op)
p1=$(metric BenchmarkCommit/plain/1M ns/op)
p64=$(metric BenchmarkCommit/plain/64M ns/op)
printf '%-36s %10s %10s %8s\n' work 9P reference ratio
awk -v c1="$c1" -v c64="$c64" -v p1="$p1" -v p64="$p64" 'BEGIN {
	printf "%-36s %10.0f %10.0f %7.2fx\n", "commits/s, 1 MiB file", 1e9 / c1, 1e9 / p1, p1 / c1
	printf "%-36s %10.0f %10.0f %7.2fx\n", "commits/s, 64 MiB file", 1e9 / c64, 1e9 / p64, p64 / c64
	printf "%-36s %10.2fx %21s\n", "9P commit rate, 64 MiB / 1 MiB", c1 / c64, "(target >= 0.5x)" }'
w=$(metric BenchmarkBigFile/9p/write MB/s)
dw=$(metric BenchmarkBigFile/dd/write MB/s)
r=$(metric BenchmarkBigFile/9p/read MB/s)
dr=$(metric BenchmarkBigFile/dd/read MB/s)
nr=$(metric BenchmarkBigFile/null/read MB/s)
pr=$(metric BenchmarkBigFile/plain/read MB/s)
xr=$(metric BenchmarkBigFile/direct/read MB/s)
sr=$(metric BenchmarkBigFile/socket/read MB/s)
awk -v w="$w" -v dw="$dw" -v r="$r" -v dr="$dr" -v pr="$pr" -v nr="$nr" -v xr="$xr" -v sr="$sr" 'BEGIN {
	printf "%-36s %10.0f %10.0f %7.2fx   (vs dd conv=fsync; target >= 0.5x)\n", "write 256 MiB + fsync, MB/s", w, dw, w / dw
	printf "%-36s %10.0f %10.0f %7.2fx   (vs dd to /dev/null from the page cache; target >= 0.25x)\n", "read 256 MiB, MB/s", r, dr, r / dr
	printf "%-36s %10.0f %10.0f %7.2fx   (vs ReadAt of 512 KiB from the page cache, in process)\n", "read 256 MiB, MB/s", r, pr, r / pr
	printf "%-36s %10.0f %10.0f %7.2fx   (vs dd to /dev/null: the transport alone, one Tread at a time)\n", "null 9P server read, MB/s", nr, dr, nr / dr
	printf "%-36s %10.0f %10.0f %7.2fx   (vs the null server: what the server keeps of the transport)\n", "read 256 MiB, MB/s", r, nr, r / nr
	printf "%-36s %10.0f %10.0f %7.2fx   (the server\047s work alone, no transport: filesystem, pread, XTS)\n", "in-process read, MB/s", xr, dr, xr / dr
	printf "%-36s %10.0f %10.0f %7.2fx   (a bare unix-socket exchange per 512 KiB, no 9P)\n", "socket read, MB/s", sr, dr, sr / dr
	c = 1 / (1 / xr + 1 / sr)
	printf "%-36s %10.0f %10.0f %7.2fx   (the two above in series: a 9P read with no 9P overhead)\n", "ceiling of one Tread at a time, MB/s", c, dr, c / dr }'
