#!/usr/bin/env bash
# make bench: the NBD export of an encrypted keygate volume (keygate disk
# serve) against nbdkit in the same run: `nbdkit file` on a plain file (the
# unencrypted ceiling) and `nbdkit --filter=luks` on a LUKS1 image (the
# nearest encrypted peer; Debian's nbdkit 1.32 reads LUKS1 only).
#
# The client is the same for every server: nbdcopy for 256 MiB sequential
# writes (with --flush, so the write is durable when it ends) and reads, fio's
# libnbd engine for 4 KiB random reads and writes at queue depth 16. Each
# figure is the best of ROUNDS runs, servers interleaved per round.
set -euo pipefail
BIN=${BIN:-bin}
ROUNDS=${ROUNDS:-3}
for tool in "$BIN/keygate" nbdkit nbdcopy fio cryptsetup python3; do
	command -v "$tool" >/dev/null || {
		echo "bench_nbd: $tool is missing; run make test-deps and make build" >&2
		exit 1
	}
done

dir=$(mktemp -d /tmp/kgnbd.XXXXXX)
pid=
stop() {
	[ -n "$pid" ] && kill -INT "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true
	pid=
}
trap 'stop; rm -rf "$dir"' EXIT

head -c 32 /dev/urandom >"$dir/k"
printf 'bench-passphrase' >"$dir/k1"
"$BIN/keygate" disk create "$dir/keygate.img" --size 272M --key-file "$dir/k" --pbkdf pbkdf2 >/dev/null
truncate -s 256M "$dir/plain.img"
truncate -s 258M "$dir/luks1.img"
cryptsetup luksFormat --type luks1 --batch-mode --cipher aes-xts-plain64 --key-size 512 \
	--pbkdf-force-iterations 1000 --key-file "$dir/k1" "$dir/luks1.img"
head -c 256M /dev/urandom >"$dir/src.raw"
sock="$dir/s"
uri="nbd+unix:///?socket=$sock"

# start SERVER: serves one of the three on $sock and waits until it answers.
start() {
	rm -f "$sock"
	case $1 in
	keygate) "$BIN/keygate" disk serve "$dir/keygate.img" --key-file "$dir/k" --nbd "$sock" >/dev/null 2>&1 & ;;
	nbdkit-file) nbdkit -f -U "$sock" file "$dir/plain.img" & ;;
	nbdkit-luks) nbdkit -f -U "$sock" --filter=luks file "$dir/luks1.img" passphrase=+"$dir/k1" & ;;
	esac
	pid=$!
	for _ in $(seq 500); do
		nbdinfo --size "$uri" >/dev/null 2>&1 && return
		sleep 0.02
	done
	echo "bench_nbd: $1 did not start" >&2
	exit 1
}

secs() { # COMMAND...: prints the seconds it took
	local t0 t1
	t0=$(date +%s.%N)
	"$@" >/dev/null
	t1=$(date +%s.%N)
	awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.4f\n", b - a }'
}

fio_iops() { # RW
	fio --name=nbd --ioengine=nbd --uri="$uri" --rw="$1" --bs=4k --iodepth=16 --size=256M \
		--time_based --runtime=4 --output-format=json 2>/dev/null | sed -n "/^{/,\$p" |
		python3 -c 'import json,sys; j=json.load(sys.stdin)["jobs"][0]; print(round(j["read"]["iops"] + j["write"]["iops"]))'
}

best() { sort -g | head -1; }
bestmax() { sort -g | tail -1; }

declare -A w r rr rw
for round in $(seq "$ROUNDS"); do
	for s in keygate nbdkit-file nbdkit-luks; do
		start "$s"
		w[$s]+="$(secs nbdcopy --flush "$dir/src.raw" "$uri") "
		r[$s]+="$(secs nbdcopy "$uri" null:) "
		if [ "$s" != nbdkit-luks ] && [ "$round" -le 2 ]; then
			rr[$s]+="$(fio_iops randread) "
			rw[$s]+="$(fio_iops randwrite) "
		fi
		stop
	done
done

fig() { tr ' ' '\n' <<<"$1" | grep . | "$2"; }
echo "== NBD export: 256 MiB sequential (nbdcopy), 4 KiB random at queue depth 16 (fio, libnbd engine) =="
echo "(best of $ROUNDS rounds, servers interleaved; load average $(cut -d' ' -f1-3 /proc/loadavg))"
kw=$(fig "${w[keygate]}" best) fw=$(fig "${w[nbdkit-file]}" best) lw=$(fig "${w[nbdkit-luks]}" best)
kr=$(fig "${r[keygate]}" best) fr=$(fig "${r[nbdkit-file]}" best) lr=$(fig "${r[nbdkit-luks]}" best)
krr=$(fig "${rr[keygate]}" bestmax) frr=$(fig "${rr[nbdkit-file]}" bestmax)
krw=$(fig "${rw[keygate]}" bestmax) frw=$(fig "${rw[nbdkit-file]}" bestmax)
awk -v kw="$kw" -v fw="$fw" -v lw="$lw" -v kr="$kr" -v fr="$fr" -v lr="$lr" \
	-v krr="$krr" -v frr="$frr" -v krw="$krw" -v frw="$frw" 'BEGIN {
	printf "%-34s %10s %12s %12s %12s %12s\n", "work", "keygate", "nbdkit file", "vs file", "nbdkit luks", "vs luks"
	printf "%-34s %10.2f %12.2f %11.2fx %12.2f %11.2fx\n", "write 256 MiB + flush, s", kw, fw, fw / kw, lw, lw / kw
	printf "%-34s %10.2f %12.2f %11.2fx %12.2f %11.2fx\n", "read 256 MiB, s", kr, fr, fr / kr, lr, lr / kr
	printf "%-34s %10.0f %12.0f %11.2fx\n", "4 KiB random reads/s, QD16", krr, frr, krr / frr
	printf "%-34s %10.0f %12.0f %11.2fx\n", "4 KiB random writes/s, QD16", krw, frw, krw / frw
	print "(targets: >= 0.7x nbdkit file both ways sequential, >= 0.5x random; the luks ratio is reported)"
}'
