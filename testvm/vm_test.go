package testvm_test

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/keygate/keygate/internal/testutil"
	"github.com/keygate/keygate/testvm"
)

// bootTimeout bounds one guest run. Under TCG on a busy 2-core machine a
// boot takes 15-40 s; the bound only turns a hung guest into a failure.
const bootTimeout = 4 * time.Minute

var (
	guestOnce sync.Once
	guestVal  *testvm.Guest
	guestErr  error
	guestDir  string
)

// guest prepares the guest once per test binary: the kernel from the cache
// (fetched on a cold cache), OVMF and a static keygate. It skips, or fails
// under KEYGATE_REQUIRE=qemu, when the machine cannot run guests.
func guest(t *testing.T) *testvm.Guest {
	t.Helper()
	if testing.Short() {
		t.Skip("skipping guest boots in -short mode")
	}
	if _, err := exec.LookPath("qemu-system-x86_64"); err != nil {
		testutil.Skip(t, "qemu", "qemu-system-x86_64 is not installed (make test installs qemu-system-x86)")
	}
	testutil.LookPath(t, "swtpm")
	if _, err := os.Stat(testvm.BusyboxPath); err != nil {
		testutil.Skip(t, "qemu", "busybox-static is not installed (make test installs it)")
	}
	guestOnce.Do(func() {
		guestDir, guestErr = os.MkdirTemp("", "kgvm-guest")
		if guestErr != nil {
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
		defer cancel()
		guestVal, guestErr = testvm.PrepareGuest(ctx, guestDir)
	})
	switch {
	case errors.Is(guestErr, testvm.ErrNoFirmware), errors.Is(guestErr, testvm.ErrNoKernelPackage):
		testutil.Skip(t, "qemu", guestErr.Error())
	case guestErr != nil:
		t.Fatalf("prepare the guest: %v", guestErr)
	}
	return guestVal
}

// TestMain fails the run if a VM's temporary directory (sockets, firmware
// variables, fw_cfg files) outlives the tests. The tests get a TMPDIR of
// their own, so another run on the same machine can't be taken for a leak.
func TestMain(m *testing.M) {
	tmp, err := os.MkdirTemp("", "testvm-run")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	os.Setenv("TMPDIR", tmp)
	code := m.Run()
	if guestDir != "" {
		os.RemoveAll(guestDir)
	}
	leaked, _ := filepath.Glob(filepath.Join(tmp, "kgvm[0-9]*"))
	for _, d := range leaked {
		fmt.Fprintf(os.Stderr, "leak: VM directory %s was not removed\n", d)
		code = 1
	}
	os.RemoveAll(tmp)
	os.Exit(code)
}

// run is one finished guest boot.
type run struct {
	results map[string]string
	console string
	initrd  []byte
	cmdline string
	// toInit is the host's time from QEMU's start to /init's first line;
	// kernelUptime is the guest kernel's uptime at that line.
	toInit, total time.Duration
	kernelUptime  string
}

type bootSpec struct {
	files   map[string][]byte // extra initramfs files
	cmdline string            // testvm.BaseCmdline when empty
	script  string            // run by /init, through fw_cfg
	fwcfg   map[string][]byte
	data    string // data disk image
	share   string // 9p share
	tpm     string // swtpm state directory kept across boots; fresh when empty
}

// boot runs one guest to power-off and returns what it reported. Every
// process it started is gone, and its files removed, when it returns.
func boot(t *testing.T, g *testvm.Guest, s bootSpec) *run {
	t.Helper()
	dir := t.TempDir()
	initrd := filepath.Join(dir, "initrd.cpio")
	if err := g.WriteInitramfs(initrd, s.files); err != nil {
		t.Fatal(err)
	}
	cfg := g.Config(initrd)
	if s.cmdline != "" {
		cfg.Cmdline = s.cmdline
	}
	cfg.DataDisk, cfg.Share, cfg.SwtpmState = s.data, s.share, s.tpm
	cfg.FwCfg = map[string][]byte{"script": []byte(s.script)}
	for k, v := range s.fwcfg {
		cfg.FwCfg[k] = v
	}
	if os.Getenv("KEYGATE_TESTVM_CONSOLE") != "" {
		cfg.Console = os.Stderr
	}
	start := time.Now()
	vm, err := testvm.Start(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { vm.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), bootTimeout)
	defer cancel()
	err = vm.Wait(ctx)
	r := &run{results: vm.Console.Results(), console: vm.Console.Text(), cmdline: cfg.Cmdline, total: time.Since(start)}
	if err != nil {
		t.Fatalf("guest run: %v", err)
	}
	assertGone(t, vm)
	if r.initrd, err = os.ReadFile(initrd); err != nil {
		t.Fatal(err)
	}
	r.toInit, _ = vm.Console.At("userspace_uptime")
	r.kernelUptime = r.results["userspace_uptime"]
	if r.results["done"] != "0" {
		t.Fatalf("guest script failed (done=%q)\n%s", r.results["done"], tail(r.console, 40))
	}
	t.Logf("boot: /init %v after QEMU started (kernel uptime %ss), power-off after %v", r.toInit.Round(time.Millisecond), r.kernelUptime, r.total.Round(time.Millisecond))
	return r
}

func (r *run) get(t *testing.T, key string) string {
	t.Helper()
	v, ok := r.results[key]
	if !ok {
		t.Fatalf("guest did not report %q\n%s", key, tail(r.console, 40))
	}
	return v
}

func (r *run) pcrs(t *testing.T) testvm.PCRs {
	t.Helper()
	p, err := testvm.ParsePCRsJSON(r.get(t, "pcrs"))
	if err != nil {
		t.Fatalf("%v\n%s", err, tail(r.console, 40))
	}
	return p
}

// tpmInfo is the part of `keygate tpm info --json` the tests check.
type tpmInfo struct {
	EventLog bool     `json:"event_log"`
	Note     string   `json:"event_log_note"`
	Banks    []string `json:"pcr_banks"`
	EK       struct {
		Fingerprint string `json:"sha256_fingerprint"`
	} `json:"ek"`
}

func (r *run) tpmInfo(t *testing.T) tpmInfo {
	t.Helper()
	var i tpmInfo
	if err := json.Unmarshal([]byte(r.get(t, "tpminfo")), &i); err != nil {
		t.Fatalf("parse keygate tpm info --json from the guest: %v: %q", err, r.results["tpminfo"])
	}
	if i.EK.Fingerprint == "" {
		t.Fatalf("keygate tpm info in the guest printed no EK fingerprint: %q", r.results["tpminfo"])
	}
	return i
}

func (r *run) eventLog(t *testing.T) []testvm.Measurement {
	t.Helper()
	raw, err := base64.StdEncoding.DecodeString(r.get(t, "eventlog"))
	if err != nil {
		t.Fatalf("decode the guest's event log: %v", err)
	}
	ms, err := testvm.ReplayEventLog(raw, r.pcrs(t))
	if err != nil {
		t.Fatalf("replay the guest's event log against its PCRs: %v", err)
	}
	return ms
}

// assertGone checks that QEMU and swtpm have been reaped.
func assertGone(t *testing.T, vm *testvm.VM) {
	t.Helper()
	vm.Close()
	for _, pid := range vm.Pids() {
		if err := syscall.Kill(pid, 0); !errors.Is(err, syscall.ESRCH) {
			t.Errorf("process %d still exists after Close (kill -0: %v)", pid, err)
		}
	}
}

func tail(s string, n int) string {
	l := strings.Split(s, "\n")
	if len(l) > n {
		l = l[len(l)-n:]
	}
	return "--- guest console ---\n" + strings.Join(l, "\n")
}

// measureScript reports what the PCR tests compare.
const measureScript = `
result tpminfo "$(keygate tpm info --tpm /dev/tpmrm0 --json | tr -d '\n')"
result pcrs "$(keygate tpm pcrs --tpm /dev/tpmrm0 --json --pcrs 0-23 | tr -d ' \n')"
result eventlog "$(base64 -w0 /sys/kernel/security/tpm0/binary_bios_measurements)"
result lsm "$(cat /sys/kernel/security/lsm)"
`

// guestScript is the baseline boot's check list.
const guestScript = measureScript + `
[ -c /dev/tpmrm0 ] && result tpmrm0 present
result cmdline "$(cat /proc/cmdline)"
result modules "$(cut -d' ' -f1 /proc/modules | sort | tr '\n' ' ')"
result filesystems "$(grep -E '\b(9p|ext4)$' /proc/filesystems | awk '{print $NF}' | sort | tr '\n' ' ')"
[ -c /dev/mapper/control ] && result dm_control present
[ -b /dev/nbd0 ] && result nbd_dev present
result data_magic "$(head -c 6 /dev/vda | od -An -tx1 | tr -d ' \n')"
mount -t 9p -o trans=virtio,version=9p2000.L host /mnt && result share "$(cat /mnt/hello)"
echo "from-guest" > /mnt/out && umount /mnt
result net "$(echo "ping-$(fwcfg nonce)" | nc 10.0.2.2 "$(fwcfg port)")"
`

var (
	baselineOnce sync.Once
	baselineRun  *run
)

// baseline boots the unmodified guest once, in the first test that needs
// it; the tamper tests compare against the same run.
func baseline(t *testing.T) *run {
	t.Helper()
	g := guest(t)
	baselineOnce.Do(func() { baselineRun = bootBaseline(t, g) })
	if baselineRun == nil {
		t.Fatal("the baseline boot failed (see the first test that ran it)")
	}
	return baselineRun
}

func bootBaseline(t *testing.T, g *testvm.Guest) *run {
	dir := t.TempDir()
	key := filepath.Join(dir, "vol.key")
	if err := os.WriteFile(key, randBytes(t, 32), 0o600); err != nil {
		t.Fatal(err)
	}
	img := filepath.Join(dir, "vol.img")
	if out, err := exec.Command(g.Keygate, "disk", "create", img, "--size", "32M", "--fs", "ext4", "--key-file", key).CombinedOutput(); err != nil {
		t.Fatalf("keygate disk create: %v\n%s", err, out)
	}
	share := filepath.Join(dir, "share")
	if err := os.Mkdir(share, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(share, "hello"), []byte("from-host\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	nonce := hex.EncodeToString(randBytes(t, 8))
	port, served := listen(t, nonce)
	r := boot(t, g, bootSpec{
		files:  map[string][]byte{"etc/testvm-build": []byte("build 0\n")},
		script: guestScript,
		fwcfg:  map[string][]byte{"nonce": []byte(nonce), "port": []byte(fmt.Sprint(port))},
		data:   img,
		share:  share,
		tpm:    tpmState(t),
	})
	select {
	case err := <-served:
		if err != nil {
			t.Errorf("host listener: %v", err)
		}
	case <-time.After(time.Second):
		t.Errorf("the guest never connected to the host listener")
	}
	if b, err := os.ReadFile(filepath.Join(share, "out")); err != nil || string(b) != "from-guest\n" {
		t.Errorf("guest's file through the 9p share: %q, %v; want \"from-guest\\n\"", b, err)
	}
	r.results["host_nonce"] = nonce
	return r
}

// listen serves one connection on the host's loopback: it expects
// "ping-NONCE" and answers "pong-NONCE".
func listen(t *testing.T, nonce string) (int, <-chan error) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	done := make(chan error, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			done <- err
			return
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(bootTimeout))
		line, err := bufio.NewReader(c).ReadString('\n')
		if err != nil {
			done <- fmt.Errorf("read from the guest: %v", err)
			return
		}
		if got := strings.TrimSpace(line); got != "ping-"+nonce {
			done <- fmt.Errorf("guest sent %q, want %q", got, "ping-"+nonce)
			return
		}
		_, err = fmt.Fprintf(c, "pong-%s\n", nonce)
		done <- err
	}()
	return ln.Addr().(*net.TCPAddr).Port, done
}

// tpmState is the vTPM state every PCR-comparing boot shares: one machine,
// rebooted, as the scenarios need it (the same EK at enrollment and unlock).
func tpmState(t *testing.T) string {
	d := filepath.Join(guestDir, "tpm")
	if err := os.MkdirAll(d, 0o700); err != nil {
		t.Fatal(err)
	}
	return d
}

func randBytes(t *testing.T, n int) []byte {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return b
}

// TestGuest boots the measured guest once and checks what it reports.
func TestGuest(t *testing.T) {
	r := baseline(t)
	t.Run("userspace", func(t *testing.T) {
		if r.get(t, "modules_failed") != "" {
			t.Errorf("modules that failed to load: %s", r.results["modules_failed"])
		}
		t.Logf("boot-to-userspace: %v on the host clock, kernel uptime %ss at /init", r.toInit.Round(time.Millisecond), r.kernelUptime)
	})
	t.Run("tpm", func(t *testing.T) {
		if r.get(t, "tpmrm0") != "present" {
			t.Errorf("/dev/tpmrm0 missing in the guest")
		}
		info := r.tpmInfo(t)
		if !info.EventLog {
			t.Errorf("keygate finds no event log in the guest: %s", info.Note)
		}
		if !slices.Contains(info.Banks, "sha256") {
			t.Errorf("vTPM PCR banks %v lack sha256", info.Banks)
		}
		p := r.pcrs(t)
		for i := 0; i < 24; i++ {
			if len(p[i]) != 32 {
				t.Errorf("keygate tpm pcrs printed no SHA-256 PCR %d", i)
			}
		}
	})
	t.Run("measured-boot", func(t *testing.T) {
		ms := r.eventLog(t)
		used := testvm.MeasuredPCRs(ms)
		// The firmware log must cover the firmware (0), the kernel (4)
		// and the initrd with the command line (9).
		for _, want := range []int{0, 4, 9} {
			if !slices.Contains(used, want) {
				t.Errorf("event log extends PCRs %v, not %d", used, want)
			}
		}
		for _, m := range ms {
			t.Logf("PCR %2d %-34s %s %s", m.PCR, m.Type, hex.EncodeToString(m.Digest)[:16], m.Data)
		}
		if got, want := r.pcrs(t)[9], testvm.PredictPCR9(r.cmdline, r.initrd); !bytes.Equal(got, want) {
			t.Errorf("PCR 9 = %x, predicted from the command line and initrd %x", got, want)
		}
	})
	t.Run("bpf-lsm", func(t *testing.T) {
		if lsm := strings.Split(r.get(t, "lsm"), ","); !slices.Contains(lsm, "bpf") {
			t.Errorf("bpf is not an active LSM in the guest: %v", lsm)
		}
		if !strings.Contains(r.get(t, "cmdline"), "lsm=lockdown,yama,bpf") {
			t.Errorf("guest command line %q lacks lsm=lockdown,yama,bpf", r.results["cmdline"])
		}
	})
	t.Run("modules", func(t *testing.T) {
		mods := strings.Fields(r.get(t, "modules"))
		for _, m := range []string{"9p", "9pnet", "9pnet_fd", "9pnet_virtio", "dm_crypt", "dm_mod", "ext4", "nbd", "virtio_blk"} {
			if !slices.Contains(mods, m) {
				t.Errorf("module %s not loaded; loaded: %v", m, mods)
			}
		}
		if fs := strings.Fields(r.get(t, "filesystems")); !slices.Equal(fs, []string{"9p", "ext4"}) {
			t.Errorf("filesystems %v, want 9p and ext4", fs)
		}
		if r.get(t, "dm_control") != "present" {
			t.Errorf("/dev/mapper/control missing: device-mapper is not usable")
		}
		if r.get(t, "nbd_dev") != "present" {
			t.Errorf("/dev/nbd0 missing: keygate boot --attach has no device")
		}
		if got := r.get(t, "share"); got != "from-host" {
			t.Errorf("9p mount of the host share read %q, want from-host", got)
		}
	})
	t.Run("data-disk", func(t *testing.T) {
		// "LUKS\xba\xbe": the keygate image reached the guest as /dev/vda.
		if got := r.get(t, "data_magic"); got != "4c554b53babe" {
			t.Errorf("first bytes of /dev/vda = %s, want the LUKS magic 4c554b53babe", got)
		}
	})
	t.Run("network", func(t *testing.T) {
		if got, want := r.get(t, "net"), "pong-"+r.results["host_nonce"]; got != want {
			t.Errorf("guest got %q from the host listener at 10.0.2.2, want %q", got, want)
		}
	})
}

// TestTamperedBoot changes one byte of the initramfs, or one kernel
// argument, and checks which PCRs and which event-log events change.
func TestTamperedBoot(t *testing.T) {
	base := baseline(t)
	g := guest(t)
	basePCRs := base.pcrs(t)
	baseEvents := base.eventLog(t)
	noBPF := strings.Replace(testvm.BaseCmdline, "lsm=lockdown,yama,bpf", "lsm=lockdown,yama", 1)
	if noBPF == testvm.BaseCmdline {
		t.Fatal("BaseCmdline has no lsm=lockdown,yama,bpf to change")
	}
	tests := []struct {
		name    string
		spec    bootSpec
		pcrs    []int    // the PCRs that must change, and only they
		events  []string // the event-log events whose digests must change
		bpfLSM  bool
		initrd1 bool // initrd differs from the baseline's by one byte
	}{
		{
			name:    "initrd-one-byte",
			spec:    bootSpec{files: map[string][]byte{"etc/testvm-build": []byte("build 1\n")}},
			pcrs:    []int{9, 10},
			events:  []string{"Linux initrd"},
			bpfLSM:  true,
			initrd1: true,
		},
		{
			// QEMU writes the initrd's size and load address into the
			// kernel's setup header before OVMF measures the kernel, so
			// under -kernel/-initrd PCR 4 follows the initrd's size.
			name:   "initrd-size",
			spec:   bootSpec{files: map[string][]byte{"etc/testvm-build": []byte("build 0\n" + strings.Repeat("#", 4096))}},
			pcrs:   []int{4, 9, 10},
			events: []string{"kernel", "Linux initrd"},
			bpfLSM: true,
		},
		{
			name:   "kernel-argument",
			spec:   bootSpec{files: map[string][]byte{"etc/testvm-build": []byte("build 0\n")}, cmdline: noBPF},
			pcrs:   []int{9, 10},
			events: []string{"LOADED_IMAGE::LoadOptions"},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			tc.spec.script = measureScript
			tc.spec.tpm = tpmState(t)
			r := boot(t, g, tc.spec)
			switch {
			case tc.initrd1:
				if n := bytesDiffering(base.initrd, r.initrd); n != 1 {
					t.Fatalf("the tampered initrd differs from the baseline in %d bytes, want 1", n)
				}
			case r.cmdline != base.cmdline:
				if !bytes.Equal(base.initrd, r.initrd) {
					t.Fatalf("the initrd changed; only the command line should")
				}
			case len(r.initrd) == len(base.initrd):
				t.Fatalf("the initrd's size did not change")
			}
			// PCR 9 holds the command line and the initrd; IMA's
			// boot_aggregate in PCR 10 hashes PCRs 0-9, so it follows.
			if got := basePCRs.Diff(r.pcrs(t)); !slices.Equal(got, tc.pcrs) {
				t.Errorf("changed PCRs %v, want %v", got, tc.pcrs)
			}
			if got, want := r.pcrs(t)[9], testvm.PredictPCR9(r.cmdline, r.initrd); !bytes.Equal(got, want) {
				t.Errorf("PCR 9 = %x, predicted %x", got, want)
			}
			if got, want := r.tpmInfo(t).EK.Fingerprint, base.tpmInfo(t).EK.Fingerprint; got != want {
				t.Errorf("EK %s after a reboot with the kept vTPM state, want the baseline's %s", got, want)
			}
			changed := changedEvents(baseEvents, r.eventLog(t))
			if !slices.Equal(changed, tc.events) {
				t.Errorf("changed events %q, want %q", changed, tc.events)
			}
			if got := slices.Contains(strings.Split(r.get(t, "lsm"), ","), "bpf"); got != tc.bpfLSM {
				t.Errorf("bpf LSM active = %v, want %v (lsm=%s)", got, tc.bpfLSM, r.results["lsm"])
			}
		})
	}
}

func bytesDiffering(a, b []byte) int {
	if len(a) != len(b) {
		return -1
	}
	n := 0
	for i := range a {
		if a[i] != b[i] {
			n++
		}
	}
	return n
}

// changedEvents pairs the two logs' events in order and names those whose
// digest differs (by their data, else their type).
func changedEvents(a, b []testvm.Measurement) []string {
	if len(a) != len(b) {
		return []string{fmt.Sprintf("event count %d -> %d", len(a), len(b))}
	}
	var d []string
	for i := range a {
		if a[i].PCR != b[i].PCR || a[i].Type != b[i].Type || !bytes.Equal(a[i].Digest, b[i].Digest) {
			name := b[i].Data
			if name == "" {
				name = b[i].Type
			}
			d = append(d, name)
		}
	}
	return d
}
