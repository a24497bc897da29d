package boot

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/keygate/keygate/disk/ninep"
	"github.com/keygate/keygate/keysvc/api"

	"github.com/awnumar/memguard"

	"github.com/keygate/keygate/disk"
	"github.com/keygate/keygate/disk/luks2"
	"github.com/keygate/keygate/internal/testutil"
	"github.com/keygate/keygate/keymem"
	"github.com/keygate/keygate/tpm"
)

// childEnv names the environment variable that turns the test binary into
// a serving `keygate boot` for TestServingProcessMemory.
const childEnv = "KEYGATE_BOOT_CHILD"

func TestMain(m *testing.M) {
	if spec := os.Getenv(childEnv); spec != "" {
		os.Exit(child(spec))
	}
	if spec := os.Getenv(attackEnv); spec != "" {
		os.Exit(attack(spec))
	}
	if os.Getenv(noRootEnv) != "" {
		os.Exit(monitorNoRoot())
	}
	code := m.Run()
	// Every key buffer the tests made must have left the key-page
	// registry by the end: one left behind is a buffer never destroyed, or
	// destroyed without unregistering (which a monitor would then guard).
	if rs := keymem.Default.Ranges(); code == 0 && len(rs) > 0 {
		fmt.Printf("FAIL: %d key ranges still registered after the tests: %v\n", len(rs), rs)
		code = 1
	}
	os.Exit(code)
}

type childSpec struct {
	URL, CAFile, VM, Image, TPM, Sock string
}

// child unlocks and serves like `keygate boot`, says "serving", and after
// the lock (a revoke) collects garbage, says "locked" and waits for stdin
// to close, so that the parent can scan it in both states.
func child(spec string) int {
	var s childSpec
	if err := json.Unmarshal([]byte(spec), &s); err != nil {
		fmt.Println("error:", err)
		return 1
	}
	ca, err := os.ReadFile(s.CAFile)
	if err != nil {
		fmt.Println("error:", err)
		return 1
	}
	b, err := Run(context.Background(), Config{KeysvcURL: s.URL, CA: ca, VM: s.VM, Image: s.Image, TPMSpec: s.TPM,
		Serve9P: s.Sock, Poll: 50 * time.Millisecond, Log: quietLog()})
	if err != nil {
		fmt.Println("error:", err)
		return 1
	}
	fmt.Println("serving")
	<-b.Done()
	b.Close()
	runtime.GC()
	debug.FreeOSMemory()
	fmt.Println("locked")
	io.Copy(io.Discard, os.Stdin)
	return 0
}

// TestServingProcessMemory runs a serving boot in another process (this
// test binary, as a child) and reads its memory from here, through
// /proc/PID/mem, as a privileged attacker or a debugger would. While it
// serves, the volume key (DEK), in 16-byte pieces, and the first AES round
// key that is not the key itself (round key 2 of each XTS half), in byte
// and in 32-bit word order, may appear only in locked mappings (memguard's
// mlock'd pages); and they must appear there, or the scan proves nothing.
// After a revoke has locked the volume, they must appear nowhere.
func TestServingProcessMemory(t *testing.T) {
	testutil.Root(t)
	sock, _ := testutil.StartSwtpm(t, "")
	e := startEnv(t)

	tp, err := tpm.Open("swtpm:" + sock)
	if err != nil {
		t.Fatal(err)
	}
	e.enroll(t, tp, "scanned", false)
	tp.Close() // swtpm serves one connection: the child's, from now on

	img, uk := knownVolume(t, e, "scanned")
	defer uk.Destroy()
	dek := volumeKey(t, img, uk)
	defer dek.Destroy()
	needles := keyNeedles(dek.Bytes(), uk.Bytes())
	defer needles.Destroy()
	ch := spawn(t, e, img, "scanned", sock)
	ch.expect("serving")

	// Right after the unlock, before other allocations can reuse freed
	// heap: the UK's path (TPM response, import, keyslot) left no copy.
	for _, h := range scanProcess(t, ch.cmd.Process.Pid, needles.list) {
		if !h.locked {
			t.Errorf("key material outside locked memory right after the unlock: %s", h)
		}
	}

	// Make the cipher work: write and read through 9P.
	root, done := p9Client(t, ch.sock)
	data := bytes.Repeat([]byte("secret data "), 10000)
	if err := ninep.WriteFile(root, "f", data); err != nil {
		t.Fatal(err)
	}
	if got, err := ninep.ReadFile(root, "f"); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("9P read back: %v", err)
	}
	done()

	hits := scanProcess(t, ch.cmd.Process.Pid, needles.list)
	locked := 0
	for _, h := range hits {
		if h.locked {
			locked++
			continue
		}
		t.Errorf("key material outside locked memory while serving: %s", h)
	}
	if locked == 0 {
		t.Fatal("the scan found no key material even in locked memory: it cannot see the key schedule, so it proves nothing")
	}
	t.Logf("while serving: %d hits, all in locked mappings", locked)

	e.admin(t, "POST", "/v1/admin/vms/scanned/revoke", nil, http.StatusOK)
	ch.expect("locked")
	for _, h := range scanProcess(t, ch.cmd.Process.Pid, needles.list) {
		t.Errorf("key material left after wipe-on-revoke: %s", h)
	}
}

// knownVolume makes a keygate image for vm whose UK this process knows
// (in locked memory; the caller destroys it), registered as VM-vol.
func knownVolume(t *testing.T, e *env, vm string) (string, *memguard.LockedBuffer) {
	t.Helper()
	img := filepath.Join(t.TempDir(), "v.img")
	uk := memguard.NewBufferRandom(api.UKSize)
	fp, _ := CAFingerprint(e.ca)
	if _, err := createImage(img, uk.Bytes(), luks2.KeygateToken{URL: e.url(), VolumeID: vm + "-vol", CASHA256: fp}, disk.CreateOptions{Size: 64 << 20, FS: disk.Ext4}); err != nil {
		t.Fatal(err)
	}
	e.admin(t, "POST", "/v1/admin/volumes", api.VolumeRequest{ID: vm + "-vol", VM: vm, Key: uk.Bytes()}, http.StatusCreated)
	return img, uk
}

// childProc is a serving boot in a child process.
type childProc struct {
	cmd    *exec.Cmd
	sock   string
	expect func(string)
}

// spawn starts a child that boots img for vm on the swtpm at tpmSock and
// serves 9P; the child is killed (if still running) and reaped at cleanup.
func spawn(t *testing.T, e *env, img, vm, tpmSock string) *childProc {
	t.Helper()
	dir := t.TempDir()
	caFile := filepath.Join(dir, "ca.pem")
	os.WriteFile(caFile, e.ca, 0o644)
	// Registered before the Cleanup below, so it runs after the child is gone.
	sock := socketPath(t)
	spec, _ := json.Marshal(childSpec{URL: e.url(), CAFile: caFile, VM: vm, Image: img, TPM: "swtpm:" + tpmSock, Sock: sock})
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), childEnv+"="+string(spec))
	stdin, _ := cmd.StdinPipe()
	stdout, _ := cmd.StdoutPipe()
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		stdin.Close()
		cmd.Process.Kill()
		cmd.Wait()
	})
	lines := bufio.NewScanner(stdout)
	return &childProc{cmd: cmd, sock: sock, expect: func(want string) {
		t.Helper()
		if !lines.Scan() || lines.Text() != want {
			t.Fatalf("child said %q (%v), want %q", lines.Text(), lines.Err(), want)
		}
	}}
}

// volumeKey opens the image's keyslot with uk, into locked memory.
func volumeKey(t *testing.T, img string, uk *memguard.LockedBuffer) *memguard.LockedBuffer {
	t.Helper()
	f, err := os.Open(img)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	vol, err := luks2.Open(f)
	if err != nil {
		t.Fatal(err)
	}
	vk, _, err := vol.Unlock(uk.Bytes())
	if err != nil {
		t.Fatal(err)
	}
	return vk
}

type needle struct {
	name string
	b    []byte // inside needleSet.buf (locked)
}

type needleSet struct {
	buf  *memguard.LockedBuffer
	list []needle
}

func (n needleSet) Destroy() { n.buf.Destroy() }

// keyNeedles builds, in one locked buffer, the DEK's 16-byte pieces and
// round key 2 of each 32-byte XTS half, each also with its 32-bit words
// byte-swapped (a schedule kept as little-endian words).
func keyNeedles(dek, uk []byte) needleSet {
	buf := memguard.NewBuffer(2*(len(dek)+2*16+len(uk)) + 2*240)
	b := buf.Bytes()
	var list []needle
	add := func(name string, p []byte) {
		n := copy(b, p)
		list = append(list, needle{name, b[:n:n]})
		b = b[n:]
		n = copy(b, p)
		swap4(b[:n])
		list = append(list, needle{name + " (words swapped)", b[:n:n]})
		b = b[n:]
	}
	for i := 0; i < len(dek); i += 16 {
		add(fmt.Sprintf("DEK[%d:%d]", i, i+16), dek[i:i+16])
	}
	for i := 0; i+16 <= len(uk); i += 16 {
		add(fmt.Sprintf("UK[%d:%d]", i, i+16), uk[i:i+16])
	}
	for h := 0; h < 2; h++ {
		sched := b[:240]
		b = b[240:]
		expand256(sched, dek[32*h:32*h+32])
		add(fmt.Sprintf("round key 2 of XTS key %d", h+1), sched[32:48])
	}
	return needleSet{buf: buf, list: list}
}

func swap4(p []byte) {
	for i := 0; i+4 <= len(p); i += 4 {
		p[i], p[i+1], p[i+2], p[i+3] = p[i+3], p[i+2], p[i+1], p[i]
	}
}

// expand256 is the FIPS-197 AES-256 key expansion, written out so that
// the test does not depend on the code it checks.
func expand256(w, key []byte) {
	gmul := func(a, b byte) byte {
		var p byte
		for ; b != 0; b >>= 1 {
			if b&1 != 0 {
				p ^= a
			}
			a = a<<1 ^ 0x1b&-(a>>7)
		}
		return p
	}
	sbox := func(a byte) byte {
		var inv byte
		for x := 1; a != 0 && x < 256; x++ {
			if gmul(a, byte(x)) == 1 {
				inv = byte(x)
				break
			}
		}
		r := func(v byte, n uint) byte { return v<<n | v>>(8-n) }
		return inv ^ r(inv, 1) ^ r(inv, 2) ^ r(inv, 3) ^ r(inv, 4) ^ 0x63
	}
	copy(w, key)
	rcon := byte(1)
	for i := 8; i < 60; i++ {
		t := [4]byte(w[4*(i-1) : 4*i])
		switch i % 8 {
		case 0:
			t = [4]byte{sbox(t[1]) ^ rcon, sbox(t[2]), sbox(t[3]), sbox(t[0])}
			rcon = gmul(rcon, 2)
		case 4:
			t = [4]byte{sbox(t[0]), sbox(t[1]), sbox(t[2]), sbox(t[3])}
		}
		for j := range 4 {
			w[4*i+j] = w[4*(i-8)+j] ^ t[j]
		}
	}
}

type hit struct {
	needle, mapping string
	addr            uint64
	locked          bool
}

func (h hit) String() string {
	return fmt.Sprintf("%s at %#x in %s (locked=%v)", h.needle, h.addr, h.mapping, h.locked)
}

// scanProcess reads every readable mapping of pid through /proc/PID/mem
// and reports where any needle occurs, and whether that mapping is locked
// (smaps "Locked:" covers it).
func scanProcess(t *testing.T, pid int, needles []needle) []hit {
	t.Helper()
	smaps, err := os.ReadFile(fmt.Sprintf("/proc/%d/smaps", pid))
	if err != nil {
		t.Fatalf("read smaps: %v", err)
	}
	mem, err := os.Open(fmt.Sprintf("/proc/%d/mem", pid))
	if err != nil {
		testutil.Skip(t, "procmem", err.Error())
	}
	defer mem.Close()
	type mapping struct {
		lo, hi      uint64
		perms, name string
		lockedKB    uint64
	}
	var maps []*mapping
	for _, line := range strings.Split(string(smaps), "\n") {
		f := strings.Fields(line)
		if len(f) >= 5 && strings.Contains(f[0], "-") && len(f[1]) == 4 {
			lo, hi, _ := strings.Cut(f[0], "-")
			m := &mapping{perms: f[1]}
			m.lo, _ = strconv.ParseUint(lo, 16, 64)
			m.hi, _ = strconv.ParseUint(hi, 16, 64)
			if len(f) >= 6 {
				m.name = f[5]
			}
			maps = append(maps, m)
			continue
		}
		if len(maps) > 0 && len(f) == 3 && f[0] == "Locked:" {
			maps[len(maps)-1].lockedKB, _ = strconv.ParseUint(f[1], 10, 64)
		}
	}
	var hits []hit
	buf := make([]byte, 1<<20)
	const overlap = 64
	scanned := 0
	for _, m := range maps {
		if m.perms[0] != 'r' || m.name == "[vvar]" || m.name == "[vsyscall]" || m.name == "[vvar_vclock]" {
			continue
		}
		locked := m.lockedKB > 0 && m.lockedKB*1024 >= m.hi-m.lo
		for off := m.lo; off < m.hi; {
			n := min(uint64(len(buf)), m.hi-off)
			k, err := mem.ReadAt(buf[:n], int64(off))
			if err != nil && k == 0 {
				break // e.g. a guard page
			}
			scanned += k
			for _, nd := range needles {
				for i := 0; ; {
					j := bytes.Index(buf[i:k], nd.b)
					if j < 0 {
						break
					}
					hits = append(hits, hit{needle: nd.name, mapping: fmt.Sprintf("%x-%x %s %s", m.lo, m.hi, m.perms, m.name), addr: off + uint64(i+j), locked: locked})
					i += j + 1
				}
			}
			if uint64(k) < n || off+uint64(k) >= m.hi {
				off += uint64(k)
				if uint64(k) < n {
					break
				}
				continue
			}
			off += uint64(k) - overlap // a needle across the boundary
		}
	}
	clear(buf)
	t.Logf("scanned %d MiB of pid %d in %d mappings", scanned>>20, pid, len(maps))
	return dedupe(hits)
}

// dedupe drops the repeats the overlap between reads can produce.
func dedupe(hs []hit) []hit {
	seen := map[string]bool{}
	var out []hit
	for _, h := range hs {
		k := h.needle + "@" + strconv.FormatUint(h.addr, 16)
		if !seen[k] {
			seen[k] = true
			out = append(out, h)
		}
	}
	return out
}
