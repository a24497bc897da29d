package luks2_test

import (
	"errors"
	"os"
	"os/exec"
	"strings"
	"testing"

	"github.com/keygate/keygate/disk/luks2"
	"github.com/keygate/keygate/internal/testutil"
	"github.com/keygate/keygate/keymem"
	"golang.org/x/sys/unix"
)

// memlockChildEnv names the image the re-executed test binary unlocks
// under a low RLIMIT_MEMLOCK.
const memlockChildEnv = "KEYGATE_LUKS2_MEMLOCK_CHILD"

// memlockLimit is below the 256000 bytes of split key material a 64-byte
// volume key's keyslot needs (4000 stripes), and above what the small key
// buffers (derived key, HMAC state, AF scratch: a page each) need.
const memlockLimit = 128 << 10

// TestUnlockUnderLowMemlock: when the kernel refuses to lock the keyslot's
// split material, Unlock returns keymem.ErrLock (which names the limit to
// raise) instead of memguard's panic, which wipes every key of the process
// first. The refusal needs a process without CAP_IPC_LOCK, so the test
// binary re-executes itself with the capability dropped (setpriv, as root)
// and the limit lowered.
func TestUnlockUnderLowMemlock(t *testing.T) {
	if img := os.Getenv(memlockChildEnv); img != "" {
		memlockChild(t, img)
		return
	}
	pass := []byte("memlock pass")
	img, _ := format(t, pass, luks2.FormatOptions{})
	args := []string{os.Args[0], "-test.run=^TestUnlockUnderLowMemlock$", "-test.v", "-test.count=1"}
	if os.Geteuid() == 0 {
		// Root's CAP_IPC_LOCK ignores RLIMIT_MEMLOCK; drop it from the
		// bounding and inheritable sets so the exec'd binary has none.
		setpriv := testutil.LookPath(t, "setpriv")
		args = append([]string{setpriv, "--inh-caps=-ipc_lock", "--bounding-set=-ipc_lock", "--"}, args...)
	}
	cmd := exec.Command(args[0], args[1:]...)
	cmd.Env = append(os.Environ(), memlockChildEnv+"="+img, "KEYGATE_LUKS2_MEMLOCK_PASS="+string(pass))
	out, err := cmd.CombinedOutput()
	if err != nil || strings.Contains(string(out), "panic:") || !strings.Contains(string(out), "--- PASS: TestUnlockUnderLowMemlock") {
		t.Fatalf("child: %v\n%s", err, out)
	}
	t.Logf("child:\n%s", out)
}

func memlockChild(t *testing.T, img string) {
	lim := unix.Rlimit{Cur: memlockLimit, Max: memlockLimit}
	if err := unix.Setrlimit(unix.RLIMIT_MEMLOCK, &lim); err != nil {
		t.Fatalf("lower RLIMIT_MEMLOCK: %v", err)
	}
	// The limit must bite, or the test below could not fail.
	probe, err := unix.Mmap(-1, 0, 1<<20, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.Mlock(probe); err == nil {
		t.Fatalf("locked 1 MiB under a %d-byte RLIMIT_MEMLOCK: the process still has CAP_IPC_LOCK", memlockLimit)
	}
	unix.Munmap(probe)

	f, err := os.Open(img)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	v, err := luks2.Open(f)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	vk, _, err := v.Unlock([]byte(os.Getenv("KEYGATE_LUKS2_MEMLOCK_PASS")))
	if err == nil {
		vk.Destroy()
		t.Fatalf("Unlock succeeded under a %d-byte RLIMIT_MEMLOCK; want keymem.ErrLock", memlockLimit)
	}
	if !errors.Is(err, keymem.ErrLock) {
		t.Fatalf("Unlock: %v; want keymem.ErrLock", err)
	}
	if !strings.Contains(err.Error(), "ulimit -l") {
		t.Fatalf("Unlock error %q does not name the limit to raise", err)
	}
	t.Logf("Unlock: %v", err)
}
