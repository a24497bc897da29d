# Run by scripts/bench_monitor_guest.sh inside the test guest: alternating
# rounds without the monitor, with --detect-only, and in deny mode.
fwcfg bench >/tmp/bench && chmod +x /tmp/bench
[ -e /etc/hostname ] || echo guest >/etc/hostname
mon() {
	rm -f /tmp/mon.err
	keygate monitor --pid 1 "$@" >/dev/null 2>/tmp/mon.err &
	M=$!
	i=0
	while ! grep -q protecting /tmp/mon.err 2>/dev/null; do
		sleep 1; i=$((i+1)); [ $i -gt 120 ] && break
	done
	head -1 /tmp/mon.err
}
for r in 1 2 3 4 5 6; do
	/tmp/bench none 100
	mon --detect-only; /tmp/bench detect 100; kill $M; wait $M
	mon; /tmp/bench deny 100; kill $M; wait $M
done
poweroff -f
