#!/usr/bin/env bash
# The reference for keygate's unlock latency: Debian's clevis unlocking a
# secret with the tang pin (tangd on loopback) and with the tpm2 pin (on a
# swtpm, the same kind of TPM `keygate boot` uses in make bench). Prints one
# line per pin: "clevis-tang p50_ms p95_ms" and "clevis-tpm2 p50_ms p95_ms".
#
# Each decrypt is a fresh `clevis decrypt` process, as at boot; the figures
# include its process start-up, which is part of what a booting machine pays.
set -euo pipefail
RUNS=${RUNS:-20}
for tool in clevis socat swtpm /usr/libexec/tangd; do
	command -v "$tool" >/dev/null || {
		echo "bench_clevis: $tool is missing; run make test-deps (it installs clevis, clevis-tpm2, tang, socat, swtpm)" >&2
		exit 1
	}
done

dir=$(mktemp -d)
pids=()
cleanup() {
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
	wait 2>/dev/null || true
	rm -rf "$dir"
}
trap cleanup EXIT

# free_port asks the kernel for an unused loopback port.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# percentiles reads milliseconds, one per line, and prints "p50 p95".
percentiles() {
	sort -n | awk '{a[NR]=$1} END {
		i50 = int(NR*0.50+0.5); if (i50 < 1) i50 = 1
		i95 = int(NR*0.95+0.5); if (i95 < 1) i95 = 1; if (i95 > NR) i95 = NR
		printf "%.1f %.1f\n", a[i50], a[i95] }'
}

# time_decrypts JWE: runs `clevis decrypt` RUNS times and prints its latencies in ms.
time_decrypts() {
	local jwe=$1 i t0 t1
	for ((i = 0; i < RUNS; i++)); do
		t0=$(date +%s%N)
		clevis decrypt <"$jwe" >"$dir/out"
		t1=$(date +%s%N)
		cmp -s "$dir/out" "$dir/secret" || { echo "bench_clevis: decrypt returned the wrong secret" >&2; exit 1; }
		echo $(((t1 - t0) / 1000)) | awk '{printf "%.3f\n", $1/1000}'
	done
}

head -c 32 /dev/urandom >"$dir/secret"

# tang: tangd speaks HTTP on stdin/stdout (it expects socket activation), so
# socat plays systemd's part.
mkdir "$dir/tang"
/usr/libexec/tangd-keygen "$dir/tang" >/dev/null
port=$(free_port)
socat "TCP-LISTEN:$port,bind=127.0.0.1,reuseaddr,fork" "EXEC:/usr/libexec/tangd $dir/tang" 2>/dev/null &
pids+=($!)
for _ in $(seq 50); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
clevis encrypt tang "{\"url\":\"http://127.0.0.1:$port\"}" -y <"$dir/secret" >"$dir/tang.jwe"
echo "clevis-tang $(time_decrypts "$dir/tang.jwe" | percentiles)"

# tpm2: a swtpm on TCP, which tpm2-tss's swtpm TCTI reaches.
mkdir "$dir/tpm"
tport=$(free_port)
swtpm socket --tpm2 --tpmstate "dir=$dir/tpm" --server "type=tcp,port=$tport,bindaddr=127.0.0.1" \
	--ctrl "type=tcp,port=$((tport + 1)),bindaddr=127.0.0.1" --flags not-need-init,startup-clear &
pids+=($!)
for _ in $(seq 50); do (exec 3<>"/dev/tcp/127.0.0.1/$tport") 2>/dev/null && break; sleep 0.1; done
export TPM2TOOLS_TCTI="swtpm:host=127.0.0.1,port=$tport"
clevis encrypt tpm2 '{"pcr_bank":"sha256","pcr_ids":"7"}' <"$dir/secret" >"$dir/tpm2.jwe"
echo "clevis-tpm2 $(time_decrypts "$dir/tpm2.jwe" | percentiles)"
