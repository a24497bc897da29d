package testvm_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/keygate/keygate/internal/testutil"
	"github.com/keygate/keygate/keysvc"
	"github.com/keygate/keygate/keysvc/api"
	"github.com/keygate/keygate/keysvc/client"
	"github.com/keygate/keygate/keysvc/store"
	"github.com/keygate/keygate/testvm"
	"github.com/keygate/keygate/tpm"
)

// scenarioScript is what every scenario boot runs: keygate boot against the
// key service on the host, then, once it serves, the steps of its mode
// (fw_cfg "mode"). A boot whose unlock is refused reports keygate's exit
// status and ends; the host reads the refusal from the console.
const scenarioScript = `
fwcfg ca >/tmp/ca.pem
mode=$(fwcfg mode)
listfiles() { (cd "$1" && find . -type f | sort | xargs sha256sum | tr '\n' ';'); }
waitkg() {
	until [ -e /tmp/kg.rc ]; do usleep 20000; done
	result kg_exit "$(cat /tmp/kg.rc)"
}
if [ "$(fwcfg eventlog)" = hide ]; then
	# See eventLogMode: keygate reads an empty log as none.
	: >/tmp/no-eventlog
	mount --bind /tmp/no-eventlog /sys/kernel/security/tpm0/binary_bios_measurements || exit 9
fi
result pcrs "$(keygate tpm pcrs --tpm /dev/tpmrm0 --json --pcrs 0-23 | tr -d ' \n')"
bootflags=$(fwcfg bootflags)
if [ -n "$(fwcfg monitor)" ]; then
	# Probe the monitor on a stand-in first: keygate boot refuses to start
	# without it, and the scenario should say why rather than just fail.
	sleep 600 & sp=$!
	( keygate monitor --pid $sp >/tmp/mon.out 2>&1; echo $? >/tmp/mon.rc ) &
	until grep -q "protecting pid" /tmp/mon.out 2>/dev/null || [ -e /tmp/mon.rc ]; do usleep 50000; done
	kill $sp
	until [ -e /tmp/mon.rc ]; do usleep 50000; done
	if grep -q "protecting pid" /tmp/mon.out; then
		bootflags="$bootflags --monitor --on-alert log"
		result monitor "$(grep -m1 'protecting pid' /tmp/mon.out)"
	else
		result monitor_error "$(tr '\n' ' ' </tmp/mon.out | head -c 600)"
	fi
fi
result kg_start "$(cut -d' ' -f1 /proc/uptime)"
(
	keygate boot --keysvc "$(fwcfg keysvc)" --ca /tmp/ca.pem --vm "$(fwcfg vm)" \
		--volume "$(fwcfg volume)" --image /dev/vda --tpm /dev/tpmrm0 \
		--serve-9p /run/kg.sock --poll 2s $bootflags 2>&1
	echo $? >/tmp/kg.rc
) &
until [ -S /run/kg.sock ] || [ -e /tmp/kg.rc ]; do usleep 20000; done
if [ ! -S /run/kg.sock ]; then
	waitkg
	exit 0
fi
result serving "$(cut -d' ' -f1 /proc/uptime)"
kg=$(pidof keygate)
mount -t 9p -o trans=unix,version=9p2000.L /run/kg.sock /mnt || exit 10
result mounted "$(cut -d' ' -f1 /proc/uptime)"
case "$mode" in
learn)
	fwcfg nonce >/mnt/learn.txt || exit 11
	result read_back "$(cat /mnt/learn.txt)"
	umount /mnt
	kill -TERM "$kg"
	waitkg
	;;
serve)
	result learn_file "$(cat /mnt/learn.txt)"
	fwcfg nonce >/mnt/hello.txt || exit 12
	mkdir /mnt/dir || exit 13
	head -c 262144 /dev/urandom >/mnt/dir/big.bin || exit 14
	result files_9p "$(listfiles /mnt)"
	if [ -x /bin/kg-attack ]; then
		result attack "$(kg-attack "$kg")"
	fi
	# The host revokes the VM now; keygate must lock on its next poll.
	result ready 1
	waitkg
	out=$(timeout 10 ls /mnt 2>&1)
	rc=$?
	result mount_after "$(echo $out) rc=$rc"
	umount -l /mnt
	if fwcfg uk >/tmp/uk; then
		cs() { /bin/ld.so --library-path /lib/cs /bin/cryptsetup --disable-locks "$@"; }
		cs open --key-file /tmp/uk /dev/vda kgx || exit 20
		rm /tmp/uk
		mkdir -p /mnt2
		mount -t ext4 -o ro /dev/mapper/kgx /mnt2 || exit 21
		result files_dm "$(listfiles /mnt2)"
		umount /mnt2
		cs close kgx || exit 22
	fi
	;;
reattest)
	# keygate re-attests every 2 s (--reattest 2s): let a few pass, then
	# measure into a policy PCR as a runtime measurement would. The next
	# re-attestation must lock the volume.
	sleep 5
	result extended "$(keygate tpm extend --tpm /dev/tpmrm0 --pcr 9 --data 'keygate test guest: a runtime measurement' | tail -n 1)"
	result extended_at "$(cut -d' ' -f1 /proc/uptime)"
	waitkg
	result locked_at "$(cut -d' ' -f1 /proc/uptime)"
	out=$(timeout 10 ls /mnt 2>&1)
	rc=$?
	result mount_after "$(echo $out) rc=$rc"
	umount -l /mnt
	;;
esac
`

// lab is the host side of the scenarios: a key service on the host's
// loopback (the guest reaches it as 10.0.2.2), and one initramfs that every
// scenario boot shares, so that a policy learned from one boot holds for the
// next.
type lab struct {
	g        *testvm.Guest
	svc      *keysvc.Service
	data     string // keysvc's data directory
	caFile   string
	token    string
	adm      *client.Client // the admin API
	guestURL string
	initrd   string
	initrdB  []byte
	// attack and crossCheck say whether the attacker and cryptsetup are
	// in the initramfs.
	attack, crossCheck bool
}

// newLab starts the key service and writes the initramfs, with extra files
// beyond the attacker and cryptsetup.
func newLab(t *testing.T, g *testvm.Guest, extra map[string][]byte) *lab {
	t.Helper()
	l := &lab{g: g, data: t.TempDir()}
	data := l.data
	var err error
	// The guest reaches the host's loopback as 10.0.2.2 (QEMU user
	// networking), so the server certificate must name that address.
	l.svc, err = keysvc.Start(context.Background(), keysvc.Config{DataDir: data, Listen: "127.0.0.1:0",
		AdminListen: "127.0.0.1:0", Hostnames: []string{"10.0.2.2"}, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatalf("start keysvc: %v", err)
	}
	t.Cleanup(func() { l.svc.Shutdown(context.Background()) })
	_, port, _ := net.SplitHostPort(l.svc.VMAddr())
	l.guestURL = "https://10.0.2.2:" + port
	l.caFile = filepath.Join(data, keysvc.CAFile)
	ca, err := os.ReadFile(l.caFile)
	if err != nil {
		t.Fatal(err)
	}
	tok, err := os.ReadFile(filepath.Join(data, keysvc.AdminTokenFile))
	if err != nil {
		t.Fatal(err)
	}
	l.token = strings.TrimSpace(string(tok))
	if l.adm, err = client.New(client.Config{URLs: []string{"https://" + l.svc.AdminAddr()}, CA: ca, Token: l.token}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(l.adm.Close)

	files := map[string][]byte{}
	dir := t.TempDir()
	if att, err := buildAttacker(dir); err != nil {
		t.Logf("no attacker in the guest, scenario 4 will skip: %v", err)
	} else {
		files["bin/kg-attack"] = att
		l.attack = true
	}
	if cs, err := cryptsetupFiles(); err != nil {
		t.Logf("no cryptsetup in the guest, scenario 7 will skip: %v", err)
	} else {
		maps.Copy(files, cs)
		l.crossCheck = true
	}
	maps.Copy(files, extra)
	l.initrd = filepath.Join(dir, "initrd.cpio")
	if err := g.WriteInitramfs(l.initrd, files); err != nil {
		t.Fatal(err)
	}
	if l.initrdB, err = os.ReadFile(l.initrd); err != nil {
		t.Fatal(err)
	}
	return l
}

// buildAttacker builds testvm/internal/attack as a static binary.
func buildAttacker(dir string) ([]byte, error) {
	return buildGuestProgram(dir, "./testvm/internal/attack")
}

// cryptsetupFiles returns the host's cryptsetup for the initramfs (see
// hostTools).
func cryptsetupFiles() (map[string][]byte, error) {
	files, err := hostTools("cryptsetup")
	if err != nil {
		return nil, fmt.Errorf("%w (install cryptsetup-bin)", err)
	}
	return files, nil
}

// hostTools returns dynamically linked host programs with the shared
// libraries ldd names, for the initramfs: each binary at bin/NAME, the
// dynamic loader at bin/ld.so (run explicitly, so the guest needs no
// /lib64) and the libraries under lib/cs. In the guest:
// /bin/ld.so --library-path /lib/cs /bin/NAME ….
func hostTools(names ...string) (map[string][]byte, error) {
	files := map[string][]byte{}
	add := func(guest, host string) error {
		b, err := os.ReadFile(host)
		if err != nil {
			return err
		}
		files[guest] = b
		return nil
	}
	for _, name := range names {
		bin, err := exec.LookPath(name)
		if err != nil {
			return nil, err
		}
		out, err := exec.Command("ldd", bin).Output()
		if err != nil {
			return nil, fmt.Errorf("ldd %s: %w", bin, err)
		}
		if err := add("bin/"+name, bin); err != nil {
			return nil, err
		}
		for _, line := range strings.Split(string(out), "\n") {
			f := strings.Fields(line)
			switch {
			case len(f) >= 3 && f[1] == "=>" && strings.HasPrefix(f[2], "/"):
				err = add("lib/cs/"+f[0], f[2])
			case len(f) >= 1 && strings.Contains(f[0], "/ld-linux"):
				err = add("bin/ld.so", f[0])
			}
			if err != nil {
				return nil, err
			}
		}
		if files["bin/ld.so"] == nil {
			return nil, fmt.Errorf("ldd %s named no dynamic loader", bin)
		}
	}
	return files, nil
}

// admin calls keysvc's admin API and fails the test unless it answers want
// (a 2xx want takes any success).
func (l *lab) admin(t *testing.T, method, path string, body any, want int) []byte {
	t.Helper()
	var b []byte
	err := l.adm.Do(context.Background(), method, path, "", body, &b)
	var se *client.Error
	switch {
	case err == nil && want/100 == 2:
	case errors.As(err, &se) && se.StatusCode == want:
	default:
		t.Fatalf("%s %s: %v, want %d", method, path, err, want)
	}
	return b
}

// machine is one VM as keysvc knows it: a vTPM state kept across its boots.
type machine struct {
	name, tpm string
}

// enroll makes a vTPM and enrolls it as name. The EK and AK are read on the
// host from the swtpm state the guest will boot with, as a cloud's API
// hands out a VM's EK; both are primary keys derived from the TPM's seeds,
// so the guest's vTPM has the same ones.
func (l *lab) enroll(t *testing.T, name string) *machine {
	t.Helper()
	state, err := os.MkdirTemp("", "kgtpm") // short: swtpm's socket path
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(state) })
	sock, stop := testutil.StartSwtpm(t, state)
	tp, err := tpm.Open("swtpm:" + sock)
	if err != nil {
		t.Fatalf("open the vTPM on the host: %v", err)
	}
	var pems [2][]byte
	for i, get := range []func(tpm.Alg) (*tpm.PublicKey, error){tp.EK, tp.AK} {
		k, err := get(tpm.ECC)
		if err != nil {
			t.Fatal(err)
		}
		if pems[i], err = k.PEM(); err != nil {
			t.Fatal(err)
		}
	}
	tp.Close()
	stop()
	l.admin(t, "POST", "/v1/admin/vms", api.EnrollRequest{Name: name, EKPub: string(pems[0]), AKPub: string(pems[1])}, http.StatusCreated)
	return &machine{name: name, tpm: state}
}

// volume makes a keygate image offline with a random unwrap key (UK) as its
// keyslot passphrase and imports the UK at keysvc for vm, as `keygate disk
// create --key-file` and `keysvc volume import` do. The UK stays in a 0600
// file of the test: it is the "test key" the host checks the volume with.
func (l *lab) volume(t *testing.T, vm, id string) (img, ukFile string) {
	t.Helper()
	return l.volumeOf(t, vm, id, "32M", "ext4")
}

// volumeOf is volume with a size and a filesystem (none when fs is empty).
func (l *lab) volumeOf(t *testing.T, vm, id, size, fs string) (img, ukFile string) {
	t.Helper()
	dir := t.TempDir()
	uk := randBytes(t, api.UKSize)
	defer clear(uk)
	ukFile = filepath.Join(dir, id+".uk")
	if err := os.WriteFile(ukFile, uk, 0o600); err != nil {
		t.Fatal(err)
	}
	img = filepath.Join(dir, id+".img")
	// pbkdf2, as `keygate disk create --keysvc` makes UK keyslots: the UK
	// is a random key, so argon2id's 256 MiB and four passes would add
	// nothing but about 20 s of every unlock under TCG.
	args := []string{"disk", "create", img, "--size", size, "--key-file", ukFile, "--pbkdf", "pbkdf2"}
	if fs != "" {
		args = append(args, "--fs", fs)
	}
	if out, err := exec.Command(l.g.Keygate, args...).CombinedOutput(); err != nil {
		t.Fatalf("keygate disk create: %v\n%s", err, out)
	}
	l.admin(t, "POST", "/v1/admin/volumes", api.VolumeRequest{ID: id, VM: vm, Key: uk}, http.StatusCreated)
	return img, ukFile
}

// eventLogMode says whether the guest's keygate sends the firmware event log
// with its quote ("send", the default) or finds none
// (KEYGATE_TESTVM_EVENTLOG=hide, for debugging the log's verification).
// OVMF's direct kernel boot measures the kernel before the "Calling EFI
// Application" event, which attest allows (see TestOVMFDirectBootLog).
func eventLogMode() string {
	if os.Getenv("KEYGATE_TESTVM_EVENTLOG") == "hide" {
		return "hide"
	}
	return "send"
}

// scenarioRun is one scenario boot, finished.
type scenarioRun struct {
	results map[string]string
	console string
	// serving and mounted are the host's times from QEMU's start to the
	// guest's "serving" (keygate's socket exists) and "mounted" lines.
	serving, mounted time.Duration
	// kgStart is the host's time from QEMU's start to the line the guest
	// prints just before it starts keygate boot.
	kgStart time.Duration
}

func (r *scenarioRun) get(t *testing.T, key string) string {
	t.Helper()
	v, ok := r.results[key]
	if !ok {
		t.Fatalf("guest did not report %q\n%s", key, tail(r.console, 60))
	}
	return v
}

// boot runs one scenario boot of m with the lab's initramfs and data disk
// img. during, when set, runs while the guest runs.
func (l *lab) boot(t *testing.T, m *machine, img, volume, cmdline string, fw map[string][]byte, during func(*testvm.VM)) *scenarioRun {
	t.Helper()
	vm := l.start(t, m, img, volume, cmdline, fw)
	ctx, cancel := context.WithTimeout(context.Background(), bootTimeout)
	defer cancel()
	if during != nil {
		during(vm)
	}
	err := vm.Wait(ctx)
	r := &scenarioRun{results: vm.Console.Results(), console: vm.Console.Text()}
	if err != nil {
		t.Fatalf("guest run: %v", err)
	}
	assertGone(t, vm)
	r.serving, _ = vm.Console.At("serving")
	r.mounted, _ = vm.Console.At("mounted")
	r.kgStart, _ = vm.Console.At("kg_start")
	if r.results["done"] != "0" {
		t.Fatalf("guest script failed (done=%q)\n%s", r.results["done"], tail(r.console, 60))
	}
	return r
}

// start starts one scenario boot of m (the scenario script, unless fw
// names another) and returns the running VM, which the test's cleanup
// closes.
func (l *lab) start(t *testing.T, m *machine, img, volume, cmdline string, fw map[string][]byte) *testvm.VM {
	t.Helper()
	ca, err := os.ReadFile(l.caFile)
	if err != nil {
		t.Fatal(err)
	}
	cfg := l.g.Config(l.initrd)
	if cmdline != "" {
		cfg.Cmdline = cmdline
	}
	cfg.DataDisk, cfg.SwtpmState = img, m.tpm
	// vCPUs for a diagnosis run (the default is one: testvm.Config).
	if n, err := strconv.Atoi(os.Getenv("KEYGATE_TESTVM_CPUS")); err == nil {
		cfg.CPUs = n
	}
	cfg.FwCfg = map[string][]byte{"script": []byte(scenarioScript), "ca": ca, "keysvc": []byte(l.guestURL),
		"vm": []byte(m.name), "volume": []byte(volume)}
	maps.Copy(cfg.FwCfg, fw)
	if eventLogMode() == "hide" {
		cfg.FwCfg["eventlog"] = []byte("hide")
	}
	if os.Getenv("KEYGATE_TESTVM_CONSOLE") != "" {
		cfg.Console = os.Stderr
	}
	vm, err := testvm.Start(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { vm.Close() })
	return vm
}

// policyPCRs parses the PCR part of a policy as keysvc shows it.
func policyPCRs(t *testing.T, raw []byte) map[int][]string {
	t.Helper()
	var p struct {
		PCRs map[string][]string `json:"pcrs"`
	}
	if err := json.Unmarshal(raw, &p); err != nil {
		t.Fatalf("parse policy %s: %v", raw, err)
	}
	out := map[int][]string{}
	for k, v := range p.PCRs {
		i, err := strconv.Atoi(k)
		if err != nil {
			t.Fatalf("policy PCR index %q", k)
		}
		out[i] = v
	}
	return out
}

// diagRE matches keygate boot's printout of the service's PCR diagnostics.
var diagRE = regexp.MustCompile(`PCR (\d+): got ([0-9a-f]+), allowed ([0-9a-f]+)`)

// guestFiles parses the guest's "sha256  ./path;" listing.
func guestFiles(t *testing.T, s string) map[string]string {
	t.Helper()
	m := map[string]string{}
	for _, e := range strings.Split(strings.TrimSuffix(s, ";"), ";") {
		f := strings.Fields(e)
		if len(f) != 2 {
			t.Fatalf("guest file listing %q: entry %q", s, e)
		}
		m[strings.TrimPrefix(f[1], "./")] = f[0]
	}
	return m
}

// TestScenarios runs issue 6's scenarios in order against one key service,
// sharing boots where one boot honestly shows several things:
//
//	boot 1  vm-a, learn mode armed: keygate unlocks, serves, the guest writes
//	        a file                                    → 1 enroll and learn
//	boot 2  vm-a, one kernel argument changed          → 3 tampered boot
//	boot 3  vm-a: unlock, 9P mount, files written; an attacker is denied;
//	        the VM is revoked while serving; the kernel's dm-crypt opens the
//	        same volume                               → 2, 4, 5, 7
//	boot 4  vm-b, whose volume was erased              → 6 erase
//
// The erase needs its own VM: keysvc answers a revoked VM's unlock with
// "revoked" before it looks at the volume.
func TestScenarios(t *testing.T) {
	g := guest(t)
	l := newLab(t, g, nil)
	a := l.enroll(t, "vm-a")
	imgA, ukA := l.volume(t, "vm-a", "vol-a")
	nonce1 := hex.EncodeToString(randBytes(t, 8))
	var learned []byte // vm-a's policy after boot 1

	steps := []struct {
		name string
		run  func(t *testing.T)
	}{
		{"1-enroll-and-learn", func(t *testing.T) {
			l.admin(t, "POST", "/v1/admin/vms/vm-a/policy/learn", nil, http.StatusOK)
			r := l.boot(t, a, imgA, "vol-a", "", map[string][]byte{"mode": []byte("learn"), "nonce": []byte(nonce1)}, nil)
			logTimes(t, r)
			if got := r.get(t, "read_back"); got != nonce1 {
				t.Errorf("file read back through the 9P mount = %q, want %q", got, nonce1)
			}
			if got := r.get(t, "kg_exit"); got != "0" {
				t.Errorf("keygate boot exited %s after SIGTERM, want 0\n%s", got, tail(r.console, 40))
			}
			var info api.VMInfo
			if err := json.Unmarshal(l.admin(t, "GET", "/v1/admin/vms/vm-a", nil, http.StatusOK), &info); err != nil {
				t.Fatal(err)
			}
			if info.LearnArmed {
				t.Errorf("learn mode still armed after the boot")
			}
			learned = info.Policy
			pol := policyPCRs(t, learned)
			guestPCRs, err := testvm.ParsePCRsJSON(r.get(t, "pcrs"))
			if err != nil {
				t.Fatal(err)
			}
			for _, i := range []int{0, 1, 2, 3, 4, 5, 6, 7, 8, 9} {
				if want := hex.EncodeToString(guestPCRs[i]); !slices.Equal(pol[i], []string{want}) {
					t.Errorf("learned PCR %d = %v, want the guest's %s", i, pol[i], want)
				}
			}
			if want := hex.EncodeToString(testvm.PredictPCR9(testvm.BaseCmdline, l.initrdB)); !slices.Equal(pol[9], []string{want}) {
				t.Errorf("learned PCR 9 = %v, predicted from the command line and initrd %s", pol[9], want)
			}
			idx := slices.Sorted(maps.Keys(pol))
			t.Logf("learned policy covers PCRs %v", idx)
			if _, ok := pol[tpm.WindowPCR]; !ok {
				t.Logf("note: the learned policy lacks PCR %d (docs/boot.md, known gaps)", tpm.WindowPCR)
			}
		}},
		{"8-reattest-locks", func(t *testing.T) {
			r := l.boot(t, a, imgA, "vol-a", "", map[string][]byte{"mode": []byte("reattest"), "bootflags": []byte("--reattest 2s")}, nil)
			logTimes(t, r)
			if got := r.get(t, "kg_exit"); got != "1" {
				t.Errorf("keygate boot exited %s after the failed re-attestation, want 1\n%s", got, tail(r.console, 40))
			}
			extendedAt := strings.Index(r.console, "KEYGATE-RESULT extended=")
			passed := strings.Index(r.console, "re-attestation passed")
			if passed < 0 || extendedAt < 0 || passed > extendedAt {
				t.Errorf("no re-attestation passed before the extend\n%s", tail(r.console, 40))
			}
			if !strings.Contains(r.console[max(extendedAt, 0):], "re-attestation failed the key service's policy") || !strings.Contains(r.console[max(extendedAt, 0):], "PCR 9") {
				t.Errorf("the console does not say the re-attestation failed on PCR 9\n%s", tail(r.console, 40))
			}
			if strings.Contains(r.console[max(extendedAt, 0):], "re-attestation passed") {
				t.Errorf("a re-attestation passed after PCR 9 was extended\n%s", tail(r.console, 40))
			}
			if got := r.get(t, "mount_after"); strings.HasSuffix(got, "rc=0") {
				t.Errorf("the 9P mount still answers after the lock: %q", got)
			}
			var evs []api.EventRecord
			if err := json.Unmarshal(l.admin(t, "GET", "/v1/admin/events?vm=vm-a&kind=reattest-failed", nil, http.StatusOK), &evs); err != nil {
				t.Fatal(err)
			}
			if len(evs) != 1 || evs[0].Severity != "critical" {
				t.Errorf("keysvc events of kind reattest-failed: %+v, want one critical", evs)
			}
			ext, _ := strconv.ParseFloat(r.get(t, "extended_at"), 64)
			locked, _ := strconv.ParseFloat(r.get(t, "locked_at"), 64)
			t.Logf("PCR 9 extended to keygate's exit (guest clock): %.2fs with --reattest 2s", locked-ext)
		}},
		{"3-tampered-boot", func(t *testing.T) {
			// An attacker turning the BPF LSM off: one kernel argument.
			cmdline := strings.Replace(testvm.BaseCmdline, "lsm=lockdown,yama,bpf", "lsm=lockdown,yama", 1)
			r := l.boot(t, a, imgA, "vol-a", cmdline, map[string][]byte{"mode": []byte("serve")}, nil)
			if _, ok := r.results["serving"]; ok {
				t.Fatalf("the tampered boot was unlocked and served\n%s", tail(r.console, 40))
			}
			if got := r.get(t, "kg_exit"); got == "0" {
				t.Errorf("keygate boot exited 0 on a refused unlock")
			}
			if !strings.Contains(r.console, "policy") {
				t.Errorf("the console does not say the policy refused the unlock\n%s", tail(r.console, 40))
			}
			diags := diagRE.FindAllStringSubmatch(r.console, -1)
			var named []string
			for _, d := range diags {
				named = append(named, d[1])
			}
			if !slices.Equal(named, []string{"9"}) {
				t.Fatalf("diagnostics name PCRs %v, want only 9\n%s", named, tail(r.console, 40))
			}
			wantGot := hex.EncodeToString(testvm.PredictPCR9(cmdline, l.initrdB))
			wantAllowed := policyPCRs(t, learned)[9][0]
			if diags[0][2] != wantGot || diags[0][3] != wantAllowed {
				t.Errorf("PCR 9 diagnostics got %s allowed %s; want got %s (predicted) allowed %s (learned)", diags[0][2], diags[0][3], wantGot, wantAllowed)
			}
			t.Logf("console: %s", diags[0][0])
		}},
		{"2-4-5-7-serve-attack-revoke-crosscheck", func(t *testing.T) {
			nonce2 := hex.EncodeToString(randBytes(t, 8))
			fw := map[string][]byte{"mode": []byte("serve"), "nonce": []byte(nonce2)}
			if l.attack {
				fw["monitor"] = []byte("1")
			}
			if l.crossCheck {
				uk, err := os.ReadFile(ukA)
				if err != nil {
					t.Fatal(err)
				}
				fw["uk"] = uk
			}
			var lockLatency time.Duration
			var events []api.EventRecord
			r := l.boot(t, a, imgA, "vol-a", "", fw, func(vm *testvm.VM) {
				ctx, cancel := context.WithTimeout(context.Background(), bootTimeout)
				defer cancel()
				if _, err := vm.Console.Result(ctx, "ready"); err != nil {
					t.Errorf("guest never got to serving: %v", err)
					return
				}
				if _, ok := vm.Console.Results()["monitor"]; ok {
					events = l.waitAlerts(t, "vm-a")
				}
				l.admin(t, "POST", "/v1/admin/vms/vm-a/revoke", nil, http.StatusOK)
				revoked := time.Now()
				if _, err := vm.Console.Result(ctx, "kg_exit"); err != nil {
					t.Errorf("keygate did not exit after the revoke: %v", err)
					return
				}
				lockLatency = time.Since(revoked)
			})
			logTimes(t, r)
			t.Run("2-unlock-and-serve", func(t *testing.T) {
				if got := r.get(t, "learn_file"); got != nonce1 {
					t.Errorf("learn.txt from boot 1 read through 9P = %q, want %q", got, nonce1)
				}
				files := guestFiles(t, r.get(t, "files_9p"))
				if got := slices.Sorted(maps.Keys(files)); !slices.Equal(got, []string{"dir/big.bin", "hello.txt", "learn.txt"}) {
					t.Fatalf("files through 9P: %v", got)
				}
				if want := sha256Hex([]byte(nonce2)); files["hello.txt"] != want {
					t.Errorf("hello.txt through 9P has sha256 %s, want %s", files["hello.txt"], want)
				}
				// The host opens the image with the test's UK, after the
				// guest has powered off.
				for name, sum := range files {
					out, err := exec.Command(g.Keygate, "disk", "get", imgA, "/"+name, "-", "--key-file", ukA).Output()
					if err != nil {
						t.Errorf("keygate disk get %s: %v", name, err)
						continue
					}
					if got := sha256Hex(out); got != sum {
						t.Errorf("host reads %s with sha256 %s; the guest wrote %s", name, got, sum)
					}
				}
			})
			t.Run("4-attack-in-the-guest", func(t *testing.T) {
				if !l.attack {
					testutil.Skip(t, "qemu", "the attacker could not be built (see the log)")
				}
				if why, ok := r.results["monitor_error"]; ok {
					testutil.Skip(t, "guest-bpf", fmt.Sprintf("keygate's monitor does not start in the guest (kernel %s): %s; "+
						"unopposed, the attacker got: %s", g.Kernel.Release, why, r.results["attack"]))
				}
				t.Logf("guest: %s", r.get(t, "monitor"))
				// The attacker runs as root, so without the monitor every
				// attempt succeeds (the skip above shows it). Every refusal
				// is the BPF LSM's: EPERM, or EACCES for the opens of
				// /proc/PID/mem by any route, which lsm/ptrace_access_check
				// refuses inside mem_open's mm_access (which turns any
				// refusal into EACCES). perf_event_open, environ and maps
				// are READ-mode access: reported, let through (deniedWant).
				checkDenied(t, r.get(t, "attack"))
				// denied comes from the LSM program's own record, whatever
				// errno the caller got.
				for _, kind := range []string{"process_vm_readv", "proc_mem", "ptrace_attach"} {
					i := slices.IndexFunc(events, func(e api.EventRecord) bool {
						return e.Kind == kind && e.Mode == "deny" && e.Denied
					})
					if i < 0 {
						t.Errorf("no %s alert with denied=true in deny mode at keysvc (GET /v1/admin/events); got %s", kind, eventSummary(events, kind))
						continue
					}
					e := events[i]
					t.Logf("keysvc event: %s severity=%s comm=%s %s", e.Kind, e.Severity, e.Comm, eventSummary([]api.EventRecord{e}, kind))
				}
				// The int 0x80 open skips the per-syscall tracepoints; deny
				// mode sees it in lsm/ptrace_access_check (mem_open's
				// mm_access), detect mode on raw_syscalls:sys_exit (issue
				// 12, item 12).
				if !slices.ContainsFunc(events, func(e api.EventRecord) bool {
					return e.Kind == "proc_mem" && e.Denied && strings.Contains(e.Message, "32-bit syscall")
				}) {
					t.Errorf("no proc_mem alert from the 32-bit (int 0x80) open, denied, at keysvc; got %s", eventSummary(events, "proc_mem"))
				}
			})
			t.Run("5-revoke-while-serving", func(t *testing.T) {
				if got := r.get(t, "kg_exit"); got != "1" {
					t.Errorf("keygate boot exited %s after the revoke, want 1", got)
				}
				if !strings.Contains(r.console, "revoked") {
					t.Errorf("the console does not say the session was revoked\n%s", tail(r.console, 40))
				}
				if got := r.get(t, "mount_after"); strings.HasSuffix(got, "rc=0") {
					t.Errorf("the 9P mount still answers after the lock: %q", got)
				}
				// A hang bound, not a performance one: the lock must come
				// from --poll 2s, not the 30 s default.
				if bound := 2*time.Second + 20*time.Second; lockLatency > bound {
					t.Errorf("lock %v after the revoke, beyond the poll period plus slack (%v)", lockLatency, bound)
				}
				t.Logf("revoke to keygate's exit (host clock, through the console): %v with --poll 2s", lockLatency.Round(time.Millisecond))
			})
			t.Run("7-cross-check-dm-crypt", func(t *testing.T) {
				if !l.crossCheck {
					testutil.Skip(t, "cryptsetup", "cryptsetup is not installed on the host (install cryptsetup-bin)")
				}
				dm, k := guestFiles(t, r.get(t, "files_dm")), guestFiles(t, r.get(t, "files_9p"))
				if !maps.Equal(dm, k) {
					t.Errorf("dm-crypt + ext4 in the kernel show %v; keygate served %v", dm, k)
				}
			})
		}},
		{"6-erase", func(t *testing.T) {
			b := l.enroll(t, "vm-b")
			imgB, _ := l.volume(t, "vm-b", "vol-b")
			// The same firmware, kernel, initrd and command line: vm-a's
			// learned policy is vm-b's too, so only the erase can refuse.
			l.admin(t, "PUT", "/v1/admin/vms/vm-b/policy", json.RawMessage(learned), http.StatusOK)
			// The sealed UK as keysvc stored it, to look for once erased.
			st, err := store.OpenSQLite(context.Background(), l.data)
			if err != nil {
				t.Fatal(err)
			}
			v, err := st.GetVolume(context.Background(), "vol-b")
			st.Close()
			if err != nil || len(v.SealedUK) == 0 {
				t.Fatalf("read vol-b's sealed UK from keysvc's store: %v (%d bytes)", err, len(v.SealedUK))
			}
			sealed := v.SealedUK
			// The control: before the erase the scan below finds it.
			if where := filesHolding(t, l.data, sealed); len(where) == 0 {
				t.Fatalf("vol-b's sealed UK is in no file of keysvc's data directory before the erase: the scan after it would prove nothing")
			} else {
				t.Logf("before the erase, vol-b's sealed UK is in %v", where)
			}
			l.admin(t, "POST", "/v1/admin/volumes/vol-b/erase", nil, http.StatusOK)
			var vol api.VolumeInfo
			if err := json.Unmarshal(l.admin(t, "GET", "/v1/admin/volumes/vol-b", nil, http.StatusOK), &vol); err != nil {
				t.Fatal(err)
			}
			if !vol.Erased {
				t.Fatalf("vol-b not erased: %+v", vol)
			}
			r := l.boot(t, b, imgB, "vol-b", "", map[string][]byte{"mode": []byte("serve")}, nil)
			if _, ok := r.results["serving"]; ok {
				t.Fatalf("an erased volume was unlocked\n%s", tail(r.console, 40))
			}
			if got := r.get(t, "kg_exit"); got == "0" {
				t.Errorf("keygate boot exited 0 for an erased volume")
			}
			line := ""
			for _, s := range strings.Split(r.console, "\n") {
				if strings.Contains(s, "erased") {
					line = s
				}
			}
			if line == "" {
				t.Fatalf("the console does not say the volume is erased\n%s", tail(r.console, 40))
			}
			t.Logf("console: %s", strings.TrimSpace(line))
			// Nothing to recover at keysvc: once it has stopped, no file in
			// its data directory (database, WAL, audit) holds the sealed UK.
			if err := l.svc.Shutdown(context.Background()); err != nil {
				t.Fatalf("stop keysvc: %v", err)
			}
			if where := filesHolding(t, l.data, sealed); len(where) > 0 {
				t.Errorf("after the erase, keysvc's data directory still holds vol-b's sealed UK in %v", where)
			}
		}},
	}
	for _, s := range steps {
		if !t.Run(s.name, s.run) {
			t.Fatalf("%s failed; the later scenarios depend on it", s.name)
		}
	}
}

// waitAlerts polls keysvc's event list for vm until the monitor's three
// alerts have arrived, and returns the list.
func (l *lab) waitAlerts(t *testing.T, vm string) []api.EventRecord {
	t.Helper()
	var evs []api.EventRecord
	for deadline := time.Now().Add(60 * time.Second); time.Now().Before(deadline); time.Sleep(500 * time.Millisecond) {
		evs = nil
		if err := json.Unmarshal(l.admin(t, "GET", "/v1/admin/events?vm="+vm+"&limit=100", nil, http.StatusOK), &evs); err != nil {
			t.Fatal(err)
		}
		n := 0
		for _, k := range []string{"process_vm_readv", "proc_mem", "ptrace_attach"} {
			if slices.ContainsFunc(evs, func(e api.EventRecord) bool { return e.Kind == k }) {
				n++
			}
		}
		// The 32-bit open of /proc/PID/mem comes last; its alert may
		// reach the key service in a later batch than the others.
		if slices.ContainsFunc(evs, func(e api.EventRecord) bool {
			return e.Kind == "proc_mem" && strings.Contains(e.Message, "32-bit syscall")
		}) {
			n++
		}
		if n == 4 {
			break
		}
	}
	return evs
}

// filesHolding names the files in dir (not its subdirectories) whose bytes
// contain b.
func filesHolding(t *testing.T, dir string, b []byte) []string {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range ents {
		if !e.Type().IsRegular() {
			continue
		}
		data, err := os.ReadFile(filepath.Join(dir, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		if bytes.Contains(data, b) {
			out = append(out, e.Name())
		}
	}
	return out
}

func logTimes(t *testing.T, r *scenarioRun) {
	t.Helper()
	start, err1 := strconv.ParseFloat(r.results["kg_start"], 64)
	serving, err2 := strconv.ParseFloat(r.results["serving"], 64)
	if err1 != nil || err2 != nil {
		return
	}
	t.Logf("boot-to-unlocked (QEMU start to keygate's 9P socket): %v; keygate started at %v, 9P mounted at %v; inside keygate, start to serving: %.2fs (guest uptime clock)",
		r.serving.Round(time.Millisecond), r.kgStart.Round(time.Millisecond), r.mounted.Round(time.Millisecond), serving-start)
}

func sha256Hex(b []byte) string {
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

// eventSummary lists keysvc's events of one kind as mode, result and denied,
// for a failure message.
func eventSummary(events []api.EventRecord, kind string) string {
	var out []string
	for _, e := range events {
		if e.Kind != kind {
			continue
		}
		res := "none"
		if e.Result != nil {
			res = strconv.FormatInt(*e.Result, 10)
		}
		out = append(out, fmt.Sprintf("mode=%s result=%s denied=%v", e.Mode, res, e.Denied))
	}
	if len(out) == 0 {
		return "no such event"
	}
	return strings.Join(out, "; ")
}
