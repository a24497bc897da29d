#!/bin/busybox sh
# /init of the keygate test guest (PID 1). It is part of the initramfs and so
# of the measured boot: anything per-run (ports, the scenario's own steps)
# arrives through QEMU fw_cfg instead, which OVMF does not measure.
#
# Results go to the serial console as "KEYGATE-RESULT key=value" lines, which
# testvm.Console parses on the host. Every run ends with "KEYGATE-RESULT
# done=EXIT" and a forced power-off, so QEMU exits on its own.
/bin/busybox mkdir -p /bin /sbin /usr/bin /usr/sbin /proc /sys /dev /tmp /run /mnt
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t securityfs securityfs /sys/kernel/security

result() { echo "KEYGATE-RESULT $1=$2"; }
result userspace_uptime "$(cut -d' ' -f1 /proc/uptime)"

failed=
for m in $(cat /etc/modules); do
	insmod "/lib/modules/$m.ko" || failed="$failed $m"
done
result modules_failed "$(echo $failed)"

# QEMU user networking: the guest is 10.0.2.15 and 10.0.2.2 is the host's
# loopback, the same addresses slirp's DHCP would hand out.
ip link set lo up
if ip link set eth0 up 2>/dev/null; then
	ip addr add 10.0.2.15/24 dev eth0
	ip route add default via 10.0.2.2
fi

# fwcfg NAME prints the fw_cfg item opt/keygate/NAME, if QEMU was given one.
fwcfg() {
	f=/sys/firmware/qemu_fw_cfg/by_name/opt/keygate/$1/raw
	[ -r "$f" ] && cat "$f"
}

status=0
if fwcfg script >/tmp/script; then
	# A subshell, so the script has result and fwcfg but cannot end PID 1.
	(. /tmp/script)
	status=$?
fi
if fwcfg shell >/dev/null; then
	echo "keygate test guest: debug shell; 'poweroff -f' ends the VM"
	setsid cttyhack sh
fi
result done "$status"
poweroff -f
