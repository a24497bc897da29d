package testvm_test

import (
	"context"
	"fmt"
	"maps"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/keygate/keygate/internal/testutil"
	"github.com/keygate/keygate/testvm"
)

// dataScript is what the data-path boots run (issue 11): keygate boot
// against the key service on the host, serving the volume one of two ways
// (fw_cfg "mode"):
//
//	nbd-load   --serve-nbd --attach /dev/nbd0, mkfs.ext4 when fw_cfg "mkfs"
//	           says so, mount, then commit SQLite transactions until the
//	           host kills the guest
//	nbd-check  attach and mount (the kernel replays ext4's journal), check
//	           the database, the I/O benchmark, e2fsck -fn; then keygate
//	           stops, the kernel's dm-crypt opens the same disk with the UK
//	           (fw_cfg "uk"), checks the database and runs the benchmark
//	9p-load    --serve-9p, mount -t 9p, commit SQLite transactions until
//	           the host kills the guest (or SQLite fails)
//	9p-check   mount again, check the database, list the files; once
//	           keygate has stopped, e2fsck -fn through dm-crypt
const dataScript = `
fwcfg ca >/tmp/ca.pem
mode=$(fwcfg mode)
n=$(fwcfg n)
# Host programs (e2fsprogs, cryptsetup) run through the host's loader.
x() { /bin/ld.so --library-path /lib/cs "$@"; }
waitkg() {
	until [ -e /tmp/kg.rc ]; do usleep 20000; done
	result kg_exit "$(cat /tmp/kg.rc)"
}
kgboot() {
	result kg_start "$(cut -d' ' -f1 /proc/uptime)"
	(
		env $(fwcfg kgenv) keygate boot --keysvc "$(fwcfg keysvc)" --ca /tmp/ca.pem --vm "$(fwcfg vm)" \
			--volume "$(fwcfg volume)" --image /dev/vda --tpm /dev/tpmrm0 --poll 2s "$@" 2>&1
		echo $? >/tmp/kg.rc
	) &
}
case "$mode" in
nbd-*)
	if [ ! -b /dev/nbd0 ]; then
		result no_nbd "no /dev/nbd0 (lsmod: $(lsmod | cut -d' ' -f1 | tr '\n' ' '))"
		exit 29
	fi
	kgboot --serve-nbd /run/kg.nbd --attach /dev/nbd0
	# Attached once the kernel knows the device's size.
	until [ "$(cat /sys/block/nbd0/size)" != 0 ] || [ -e /tmp/kg.rc ]; do usleep 20000; done
	if [ -e /tmp/kg.rc ]; then
		waitkg
		exit 0
	fi
	result serving "$(cut -d' ' -f1 /proc/uptime)"
	result nbd_sectors "$(cat /sys/block/nbd0/size)"
	q() { for d; do echo "$d:$(cd /sys/block/$d/queue && echo lbs=$(cat logical_block_size) max_sectors_kb=$(cat max_sectors_kb) read_ahead_kb=$(cat read_ahead_kb) sched=$(cat scheduler | tr ' ' ,))"; done; }
	result queues "$(q nbd0 vda | tr '\n' ' ')"
	# What a system call costs depends on these (page-table isolation
	# switches page tables, which TCG pays as a TLB flush, on every call).
	result cpu_mitigations "$(cd /sys/devices/system/cpu/vulnerabilities 2>/dev/null && for f in meltdown spectre_v2 retbleed; do printf '%s=%s; ' $f "$(cat $f 2>/dev/null)"; done)"
	kg=$(pidof keygate)
	if [ -n "$(fwcfg mkfs)" ]; then
		# 4 KiB blocks: mke2fs would pick 1 KiB for a volume this small.
		x /bin/mke2fs -q -F -t ext4 -b 4096 /dev/nbd0 || exit 30
		result mkfs ok
	fi
	mount -t ext4 /dev/nbd0 /mnt || exit 31
	result mounted "$(cut -d' ' -f1 /proc/uptime)"
	result ext4_log "$(dmesg | grep 'EXT4-fs (nbd0)' | tr '\n' ' ')"
	case "$mode" in
	nbd-load)
		kg-workload sqlite-run /mnt/db.sqlite "$n"
		result load_exit $?
		;;
	nbd-check)
		kg-workload sqlite-check /mnt/db.sqlite
		KG_PERF_PHASES=$(fwcfg perf 2>/dev/null) kg-workload io nbd /mnt/io.bin "$(fwcfg io_mib)" "$(fwcfg io_ops)"
		rm -f /mnt/io.bin
		umount /mnt || exit 32
		x /bin/e2fsck -fn /dev/nbd0 >/tmp/fsck.out 2>&1
		result fsck "rc=$? $(tail -n 1 /tmp/fsck.out)"
		# PF_MEMALLOC_NOIO (0x80000) in each thread's flags: PR_SET_IO_FLUSHER.
		result io_flusher "$(cat /proc/$kg/task/*/stat | awk '{ n++; if (and($9, 524288)) m++ } END { printf "threads=%d marked=%d", n, m }')"
		kill -TERM "$kg"
		waitkg
		# How busy the idle guest is once keygate is gone (anything left
		# running would slow the dm-crypt half): busy and total ticks over 2 s.
		s1=$(head -n 1 /proc/stat); sleep 2; s2=$(head -n 1 /proc/stat)
		result idle_after_kg "$(echo "$s1 $s2" | awk '{ for (i = 2; i <= 9; i++) { t1 += $i; t2 += $(i + 11) } b1 = t1 - $5 - $6; b2 = t2 - $16 - $17; printf "busy=%d total=%d", b2 - b1, t2 - t1 }') $(ps -o comm,stat 2>/dev/null | grep -v ' S' | tr '\n' ' ')"
		# The same disk through the kernel's dm-crypt, keygate gone.
		[ -e /bin/cryptsetup ] || exit 0
		fwcfg uk >/tmp/uk || exit 33
		x /bin/cryptsetup --disable-locks open --key-file /tmp/uk /dev/vda kgx || exit 34
		rm /tmp/uk
		mount -t ext4 /dev/mapper/kgx /mnt || exit 35
		kg-workload sqlite-check /mnt/db.sqlite | sed 's/RESULT sqlite_/RESULT dm_sqlite_/'
		KG_PERF_PHASES=$(fwcfg perf 2>/dev/null) kg-workload io dmcrypt /mnt/io.bin "$(fwcfg io_mib)" "$(fwcfg io_ops)"
		rm -f /mnt/io.bin
		umount /mnt || exit 36
		x /bin/cryptsetup --disable-locks close kgx || exit 37
		# Profiles of the phases KEYGATE_TESTVM_PERF named, on the console.
		for f in /tmp/perf.*; do
			[ -e "$f" ] || continue
			p=${f#/tmp/perf.}
			x /bin/perf report -i "$f" --stdio --no-children --sort comm,dso,sym -g none --percent-limit 0.7 2>/dev/null |
				grep -v '^#' | grep -v '^$' | head -60 | sed "s|^|KEYGATE-PERF $p self: |"
			x /bin/perf report -i "$f" --stdio --children --comms keygate --sort sym -g none --percent-limit 3 2>/dev/null |
				grep -v '^#' | grep -v '^$' | head -50 | sed "s|^|KEYGATE-PERF $p keygate-children: |"
			# Who calls keygate's costliest kernel functions (a page
			# fault's clear_page, the copies): callee chains of its self time.
			x /bin/perf report -i "$f" --stdio --no-children --comms keygate --sort sym -g graph,2,callee,function --percent-limit 1.5 2>/dev/null |
				grep -v '^#' | grep -v '^$' | head -220 | sed "s|^|KEYGATE-PERF $p keygate-chains: |"
		done
		;;
	esac
	;;
9p-*)
	kgboot --serve-9p /run/kg.sock
	until [ -S /run/kg.sock ] || [ -e /tmp/kg.rc ]; do usleep 20000; done
	if [ ! -S /run/kg.sock ]; then
		waitkg
		exit 0
	fi
	result serving "$(cut -d' ' -f1 /proc/uptime)"
	kg=$(pidof keygate)
	mount -t 9p -o "trans=unix,version=9p2000.L,msize=524288$(fwcfg mountopts)" /run/kg.sock /mnt || exit 40
	result mounted "$(cut -d' ' -f1 /proc/uptime)"
	case "$mode" in
	9p-load)
		kg-workload probe /mnt
		# The same with the page cache that allows shared writable mmap.
		mkdir -p /mnt2
		if mount -t 9p -o trans=unix,version=9p2000.L,msize=524288,cache=mmap /run/kg.sock /mnt2; then
			kg-workload probe /mnt2 | sed 's/RESULT probe/RESULT probe_cache_mmap/'
			umount /mnt2
		fi
		# SQLite as it comes first (file locks); without them if that fails.
		kg-workload sqlite-run /mnt/locking.sqlite 10 | sed 's/RESULT sqlite/RESULT locking_sqlite/'
		if [ -e /mnt/locking.sqlite ] && kg-workload sqlite-check /mnt/locking.sqlite >/dev/null; then
			result sqlite_vfs unix
		else
			result sqlite_vfs unix-none
			export KG_SQLITE_NOLOCK=1
		fi
		kg-workload sqlite-run /mnt/db.sqlite "$n"
		result load_exit $?
		;;
	9p-check)
		result files_9p "$(ls -a /mnt | tr '\n' ' ')"
		[ "$(fwcfg vfs)" = unix-none ] && export KG_SQLITE_NOLOCK=1
		kg-workload sqlite-check /mnt/db.sqlite
		;;
	esac
	umount /mnt
	kill -TERM "$kg"
	waitkg
	if [ "$mode" = 9p-check ] && [ -e /bin/cryptsetup ] && fwcfg uk >/tmp/uk; then
		# After keygate's writable open (its repair, if the crash needed
		# one), the kernel's e2fsck through dm-crypt must find nothing.
		x /bin/cryptsetup --disable-locks open --key-file /tmp/uk /dev/vda kgx || exit 41
		rm /tmp/uk
		x /bin/e2fsck -fn /dev/mapper/kgx >/tmp/fsck.out 2>&1
		result fsck "rc=$? $(tail -n 1 /tmp/fsck.out)"
		x /bin/cryptsetup --disable-locks close kgx || exit 42
	fi
	;;
esac
`

// dataFiles are the initramfs files the data-path boots need beyond the
// lab's: the workload, and mke2fs and e2fsck from the host's e2fsprogs
// (busybox has neither).

// sqliteMountOpts are the 9P mount options SQLite's WAL mode needs: its
// index (-shm) is a shared writable mapping, which v9fs allows only with a
// page cache for mmap (docs/disk.md, "9P export").
const sqliteMountOpts = ",cache=mmap"

func dataFiles(t *testing.T) map[string][]byte {
	t.Helper()
	dir := t.TempDir()
	wl, err := buildGuestProgram(dir, "./testvm/internal/workload")
	if err != nil {
		t.Fatal(err)
	}
	files, err := hostTools("mke2fs", "e2fsck")
	if err != nil {
		t.Fatalf("e2fsprogs for the guest: %v (install e2fsprogs)", err)
	}
	files["bin/kg-workload"] = wl
	if os.Getenv("KEYGATE_TESTVM_PERF") != "" {
		// The host's perf (Debian linux-perf, 6.1 like the guest's
		// kernel), for profiling the I/O benchmark's phases.
		perf, err := hostTools("perf")
		if err != nil {
			t.Fatalf("KEYGATE_TESTVM_PERF: perf for the guest: %v (install linux-perf)", err)
		}
		maps.Copy(files, perf)
	}
	if conf, err := os.ReadFile("/etc/mke2fs.conf"); err == nil {
		files["etc/mke2fs.conf"] = conf
	}
	return files
}

// buildGuestProgram builds a static binary of pkg for the guest.
func buildGuestProgram(dir, pkg string) ([]byte, error) {
	root, err := testvm.ModuleRoot()
	if err != nil {
		return nil, err
	}
	out := filepath.Join(dir, filepath.Base(pkg))
	cmd := exec.Command("go", "build", "-buildvcs=false", "-ldflags=-s -w", "-o", out, pkg)
	cmd.Dir = root
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH=amd64")
	if b, err := cmd.CombinedOutput(); err != nil {
		return nil, fmt.Errorf("build %s: %v\n%s", pkg, err, b)
	}
	return os.ReadFile(out)
}

// Kill points of the load boots: QEMU is killed once the guest has reported
// killAfterTx commits, or killAfter after its first commit, whichever comes
// first. Neither is asserted; they only bound the run.
const (
	killAfterTx = 2000
	killAfter   = 60 * time.Second
	// loadTx is what the guest is asked to commit: more than it gets to.
	loadTx = 1000000
)

// loadRun is a load boot, killed.
type loadRun struct {
	results map[string]string
	console string
	// committed is the last sequence number the guest reported committed
	// before QEMU died: every one up to it was acknowledged by COMMIT.
	committed int
}

// crash boots a load mode, waits for commits, and kills QEMU (SIGKILL: the
// guest's page cache and keygate's memory are lost; the image file keeps
// what QEMU had written to it, as a disk keeps what reached it).
func (l *lab) crash(t *testing.T, m *machine, img, volume string, fw map[string][]byte) *loadRun {
	t.Helper()
	vm := l.start(t, m, img, volume, "", fw)
	ctx, cancel := context.WithTimeout(context.Background(), bootTimeout)
	defer cancel()
	var first time.Time
	for {
		res := vm.Console.Results()
		c, _ := strconv.Atoi(res["sqlite_committed"])
		if c > 0 && first.IsZero() {
			first = time.Now()
		}
		if c >= killAfterTx || !first.IsZero() && time.Since(first) > killAfter {
			break
		}
		if _, ok := res["load_exit"]; ok {
			break // the load ended on its own (an error)
		}
		if _, ok := res["done"]; ok {
			break
		}
		select {
		case <-vm.Console.Done():
		case <-ctx.Done():
			t.Fatalf("no commits before the boot timeout\n%s", vm.Console.Tail(60))
		case <-time.After(100 * time.Millisecond):
		}
		if vm.Exited() {
			break
		}
	}
	vm.Close()
	<-vm.Console.Done() // every line QEMU wrote before it died
	assertGone(t, vm)
	r := &loadRun{results: vm.Console.Results(), console: vm.Console.Text()}
	r.committed, _ = strconv.Atoi(r.results["sqlite_committed"])
	return r
}

// checkDB parses "rows=R max=M missing=G bad=B meta_last=L" and checks that
// the database holds every transaction up to committed, intact.
func checkDB(t *testing.T, integrity, check string, committed int) (rows int) {
	t.Helper()
	if integrity != "ok" {
		t.Errorf("PRAGMA integrity_check: %q, want ok", integrity)
	}
	v := map[string]int{}
	for _, f := range strings.Fields(check) {
		k, s, _ := strings.Cut(f, "=")
		n, err := strconv.Atoi(s)
		if err != nil {
			t.Fatalf("sqlite_check %q: %v", check, err)
		}
		v[k] = n
	}
	if v["missing"] != 0 || v["bad"] != 0 || v["rows"] != v["max"] {
		t.Errorf("database after the crash: %s; want no sequence missing and no row damaged", check)
	}
	if v["meta_last"] != v["max"] {
		t.Errorf("database after the crash: %s; the one-row table and the rows were written in one transaction", check)
	}
	if v["max"] < committed {
		t.Errorf("database after the crash ends at transaction %d; the guest reported %d committed before the kill", v["max"], committed)
	}
	return v["max"]
}

// ioFigures parses an io_LABEL result.
func ioFigures(t *testing.T, s string) map[string]float64 {
	t.Helper()
	m := map[string]float64{}
	for _, f := range strings.Fields(s) {
		k, v, _ := strings.Cut(f, "=")
		x, err := strconv.ParseFloat(v, 64)
		if err != nil {
			t.Fatalf("io result %q: %v", s, err)
		}
		m[k] = x
	}
	return m
}

// TestDataPath runs issue 11's workload in the guest: a real SQLite (WAL,
// synchronous=FULL) committing on the unlocked volume, QEMU killed in the
// middle, and after a reboot and a fresh attestation every transaction the
// guest saw committed must be there, intact:
//
//	nbd  ext4 on /dev/nbd0 (keygate boot --serve-nbd --attach); after the
//	     crash the kernel replays ext4's journal; then e2fsck -fn, and the
//	     same file I/O benchmark on the NBD device and on dm-crypt opening
//	     the same disk in the same guest
//	9p   the same workload on the 9P mount
//
// One VM with two volumes; the first boot learns its policy.
func TestDataPath(t *testing.T) {
	g := guest(t)
	l := newLab(t, g, dataFiles(t))
	m := l.enroll(t, "vm-db")
	l.admin(t, "POST", "/v1/admin/vms/vm-db/policy/learn", nil, http.StatusOK)

	t.Run("nbd", func(t *testing.T) {
		img, ukFile := l.volumeOf(t, "vm-db", "vol-nbd", "256M", "")
		load := l.crash(t, m, img, "vol-nbd", map[string][]byte{"script": []byte(dataScript),
			"mode": []byte("nbd-load"), "mkfs": []byte("1"), "n": []byte(strconv.Itoa(loadTx))})
		requireModules(t, load.results, load.console)
		if load.committed == 0 {
			t.Fatalf("the guest reported no commit on ext4 over NBD\n%s", tail(load.console, 60))
		}
		t.Logf("NBD load: QEMU killed after %d transactions reported committed; guest rate %s", load.committed, load.results["sqlite_rate"])
		uk, err := os.ReadFile(ukFile)
		if err != nil {
			t.Fatal(err)
		}
		fw := map[string][]byte{"script": []byte(dataScript), "mode": []byte("nbd-check"),
			"uk": uk, "io_mib": []byte("64"), "io_ops": []byte("500")}
		// Environment for keygate in the measured boot, for trying a
		// runtime setting (GOMAXPROCS=2, GODEBUG=...) without a rebuild.
		if env := os.Getenv("KEYGATE_TESTVM_KGENV"); env != "" {
			fw["kgenv"] = []byte(env)
		}
		// Phases to profile with perf in the guest (a diagnosis: perf's
		// own work slows the phase it records).
		if phases := os.Getenv("KEYGATE_TESTVM_PERF"); phases != "" {
			fw["perf"] = []byte(phases)
		}
		r := l.boot(t, m, img, "vol-nbd", "", fw, nil)
		t.Logf("after the reboot: %s", r.get(t, "ext4_log"))
		max := checkDB(t, r.get(t, "sqlite_integrity"), r.get(t, "sqlite_check"), load.committed)
		t.Logf("after the reboot: %d transactions present, %d reported committed before the kill", max, load.committed)
		if got := r.get(t, "fsck"); !strings.HasPrefix(got, "rc=0 ") {
			t.Errorf("e2fsck -fn after the journal replay: %s", got)
		}
		// Attach marks the whole process PR_SET_IO_FLUSHER (a static
		// keygate can), so that any thread may serve the device.
		if got := r.get(t, "io_flusher"); !ioFlusherAll(got) {
			t.Errorf("keygate's threads after the workload: %s; want every one marked PR_SET_IO_FLUSHER", got)
		} else {
			t.Logf("keygate's threads after the workload: %s (PR_SET_IO_FLUSHER)", got)
		}
		if got := r.get(t, "kg_exit"); got != "0" {
			t.Errorf("keygate boot exited %s after SIGTERM with the device attached, want 0", got)
		}
		t.Run("vs-dm-crypt", func(t *testing.T) {
			if !l.crossCheck {
				testutil.Skip(t, "cryptsetup", "cryptsetup is not installed on the host (install cryptsetup-bin)")
			}
			if dm, k := r.get(t, "dm_sqlite_check"), r.get(t, "sqlite_check"); dm != k {
				t.Errorf("the database through dm-crypt: %s; through keygate's NBD export: %s", dm, k)
			}
			t.Logf("block queues in the guest: %s", r.get(t, "queues"))
			t.Logf("the guest CPU's mitigations: %s", r.results["cpu_mitigations"])
			t.Logf("the guest after keygate exited, before dm-crypt (ticks of 10 ms over 2 s; processes not sleeping): %s", r.results["idle_after_kg"])
			nbd, dm := ioFigures(t, r.get(t, "io_nbd")), ioFigures(t, r.get(t, "io_dmcrypt"))
			for _, k := range []string{"seqwrite_mibs", "seqread_mibs", "randwrite_iops", "randread_iops"} {
				t.Logf("ext4 on NBD vs ext4 on dm-crypt, %s: %.2f vs %.2f = %.2fx", k, nbd[k], dm[k], nbd[k]/dm[k])
			}
			// What each phase cost the guest, per MiB or per operation.
			t.Logf("guest cost on NBD: %s", r.results["iocost_nbd"])
			t.Logf("guest cost on dm-crypt: %s", r.results["iocost_dmcrypt"])
			for _, line := range strings.Split(r.console, "\n") {
				if p, ok := strings.CutPrefix(strings.TrimRight(line, "\r"), "KEYGATE-PERF "); ok {
					t.Logf("perf %s", p)
				}
			}
		})
	})

	t.Run("9p", func(t *testing.T) {
		img, ukFile := l.volumeOf(t, "vm-db", "vol-9p", "64M", "ext4")
		load := l.crash(t, m, img, "vol-9p", map[string][]byte{"script": []byte(dataScript),
			"mode": []byte("9p-load"), "n": []byte(strconv.Itoa(loadTx)), "mountopts": []byte(sqliteMountOpts)})
		requireModules(t, load.results, load.console)
		probe := load.results["probe"]
		t.Logf("on the 9P mount: %s; with -o cache=mmap: %s", probe, load.results["probe_cache_mmap"])
		vfs := load.results["sqlite_vfs"]
		if vfs == "unix-none" {
			// SQLite as it comes failed on the mount; the workload then ran
			// with SQLite's unix-none VFS in exclusive locking mode. The
			// probe must say why, or the failure is a new one.
			why := load.results["locking_sqlite-run_error"]
			var refused []string
			for _, w := range strings.Fields(probe) {
				if k, v, _ := strings.Cut(w, "="); v != "ok" && k != "flock" {
					refused = append(refused, w)
				}
			}
			if len(refused) == 0 {
				t.Errorf("SQLite (unix VFS, WAL) failed on the 9P mount although every lock and mapping it needs works there: %s", why)
			} else {
				t.Logf("note: SQLite (unix VFS, WAL) fails on the 9P mount: %s; the mount refuses %s (docs/testvm.md, \"What 9P does with SQLite\")", why, strings.Join(refused, " "))
			}
		}
		if why, ok := load.results["sqlite-run_error"]; ok {
			t.Fatalf("SQLite (vfs %s) failed on the 9P mount after %d commits: %s\n%s", vfs, load.committed, why, tail(load.console, 40))
		}
		if load.committed == 0 {
			t.Fatalf("the guest reported no commit on the 9P mount\n%s", tail(load.console, 60))
		}
		t.Logf("9P load (SQLite vfs %s): QEMU killed after %d transactions reported committed; guest rate %s", vfs, load.committed, load.results["sqlite_rate"])
		uk, err := os.ReadFile(ukFile)
		if err != nil {
			t.Fatal(err)
		}
		r := l.boot(t, m, img, "vol-9p", "", map[string][]byte{"script": []byte(dataScript), "mode": []byte("9p-check"), "vfs": []byte(vfs), "uk": uk, "mountopts": []byte(sqliteMountOpts)}, nil)
		t.Logf("files on the 9P mount after the crash: %s", r.get(t, "files_9p"))
		t.Run("e2fsck", func(t *testing.T) {
			if !l.crossCheck {
				testutil.Skip(t, "cryptsetup", "cryptsetup is not installed on the host (install cryptsetup-bin)")
			}
			if got := r.get(t, "fsck"); !strings.HasPrefix(got, "rc=0 ") {
				t.Errorf("e2fsck -fn through dm-crypt, after keygate's next open of the crashed volume: %s", got)
			} else {
				t.Logf("e2fsck -fn through dm-crypt after the reboot: %s", got)
			}
		})
		max := checkDB(t, r.get(t, "sqlite_integrity"), r.get(t, "sqlite_check"), load.committed)
		t.Logf("after the reboot: %d transactions present, %d reported committed before the kill", max, load.committed)
	})
}

// requireModules fails the test when the guest could not load a module.
func requireModules(t *testing.T, results map[string]string, console string) {
	t.Helper()
	if failed, ok := results["modules_failed"]; !ok || failed != "" {
		t.Fatalf("the guest failed to load modules %q (testvm.DefaultModules)\n%s", failed, tail(console, 40))
	}
	if why, ok := results["no_nbd"]; ok {
		t.Fatalf("the guest has no NBD device: %s", why)
	}
}

// ioFlusherAll reports whether the guest's "threads=N marked=M" line has
// every one of at least one thread marked.
func ioFlusherAll(line string) bool {
	var n, m int
	if _, err := fmt.Sscanf(line, "threads=%d marked=%d", &n, &m); err != nil {
		return false
	}
	return n > 0 && m == n
}
