package browsertest

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
	"unsafe"

	"github.com/chromedp/cdproto/network"
	"github.com/chromedp/chromedp"
	"golang.org/x/sys/unix"

	"github.com/keygate/keygate/boot"
	"github.com/keygate/keygate/disk"
	"github.com/keygate/keygate/internal/testutil"
	"github.com/keygate/keygate/internal/tpmtest"
	"github.com/keygate/keygate/keymem"
	"github.com/keygate/keygate/keysvc"
	"github.com/keygate/keygate/keysvc/audit"
)

// attackEnv makes the test binary the attacker: "PID ADDR LEN" reads LEN
// bytes at ADDR of PID through /proc/PID/mem, under the process name
// attackComm.
const attackEnv = "KEYGATE_DASHBOARD_ATTACK"

// attackComm is the attacker's process name: markup, which the dashboard
// must show as text.
const attackComm = "<svg/onload=1>"

func init() {
	spec := os.Getenv(attackEnv)
	if spec == "" {
		return
	}
	// PR_SET_NAME names this thread only: the read below must run on it.
	runtime.LockOSThread()
	os.Exit(attack(spec))
}

func attack(spec string) int {
	f := strings.Fields(spec)
	if len(f) != 3 {
		fmt.Println("bad attack spec", spec)
		return 2
	}
	pid, _ := strconv.Atoi(f[0])
	addr, _ := strconv.ParseUint(f[1], 0, 64)
	n, _ := strconv.Atoi(f[2])
	name, _ := unix.BytePtrFromString(attackComm)
	if err := unix.Prctl(unix.PR_SET_NAME, uintptr(unsafe.Pointer(name)), 0, 0, 0); err != nil {
		fmt.Println("prctl:", err)
		return 2
	}
	// When the attempt began, for the latency to the page.
	fmt.Printf("at=%d ", time.Now().UnixNano())
	fd, err := unix.Open(fmt.Sprintf("/proc/%d/mem", pid), unix.O_RDONLY, 0)
	if err == nil {
		buf := make([]byte, n)
		_, err = unix.Pread(fd, buf, int64(addr))
		clear(buf)
		unix.Close(fd)
	}
	fmt.Println("attempted:", err)
	return 0
}

// artifacts is where the screenshots go: $KEYGATE_ARTIFACTS, or a fixed
// directory under the OS temp dir that outlives the test.
func artifacts(t *testing.T) string {
	dir := os.Getenv("KEYGATE_ARTIFACTS")
	if dir == "" {
		dir = filepath.Join(os.TempDir(), "keygate-artifacts")
	}
	dir = filepath.Join(dir, "dashboard")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	return dir
}

// TestDashboardInBrowser: log in, see the VMs, attack a monitored boot and
// watch the alert arrive on the VM page without a reload, shown as text with
// no script run, revoke the VM from the page and see the boot lock.
func TestDashboardInBrowser(t *testing.T) {
	testutil.Root(t) // the key-page monitor's BPF programs
	chromium := testutil.LookPath(t, "chromium")
	art := artifacts(t)
	t.Logf("artifacts (screenshots): %s", art)

	dir := t.TempDir()
	svc, err := keysvc.Start(context.Background(), keysvc.Config{DataDir: filepath.Join(dir, "keysvc"),
		Listen: "127.0.0.1:0", AdminListen: "127.0.0.1:0", Logger: quiet()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { svc.Shutdown(context.Background()) })
	ca, err := os.ReadFile(svc.Data.Path(keysvc.CAFile))
	if err != nil {
		t.Fatal(err)
	}
	tokb, err := os.ReadFile(svc.Data.Path(keysvc.AdminTokenFile))
	if err != nil {
		t.Fatal(err)
	}
	token := strings.TrimSpace(string(tokb))
	adm := newAdminClient(t, "https://"+svc.AdminAddr(), token, ca)

	tp := tpmtest.Open(t, "sim")
	const vm, other = "web-1", "db-1"
	adm.enroll(tp, vm)
	adm.enroll(tp, other) // never unlocked
	img := filepath.Join(dir, "vol.img")
	res, err := boot.CreateVolume(context.Background(), boot.CreateConfig{Image: img, KeysvcURL: "https://" + svc.VMAddr(),
		AdminURL: adm.base, CA: ca, Token: token, VM: vm, Volume: vm + "-data",
		Options: disk.CreateOptions{Size: 64 << 20, FS: disk.Ext4}})
	if err != nil {
		t.Fatalf("create volume: %v", err)
	}
	res.Wipe()
	before := keymem.Default.Ranges()
	b, err := boot.Run(context.Background(), boot.Config{KeysvcURL: "https://" + svc.VMAddr(), CA: ca, VM: vm, Image: img,
		TPM: tp, Serve9P: filepath.Join(testutil.ShortTempDir(t), "9p"), Poll: time.Second, Log: quiet(), Monitor: true})
	if err != nil {
		var r *boot.Refusal
		if errors.As(err, &r) {
			t.Fatalf("boot refused: %v", err)
		}
		testutil.Skip(t, "bpf", "the monitored boot did not start: "+err.Error())
	}
	defer b.Close()
	var key uint64
	for _, r := range keymem.Default.Ranges() {
		if !contains(before, r) {
			key = r.Start
			break
		}
	}
	if key == 0 {
		t.Fatal("no key pages registered while serving")
	}

	ctx, cancel := browser(t, chromium, svc.AdminAddr(), ca)
	defer cancel()
	base := adm.base

	// Without a session every page sends to the login.
	do(t, ctx, "open a VM page logged out", chromedp.Navigate(base+"/ui/vm/"+vm), chromedp.WaitVisible(chromedp.CSS("#token")))
	if url := get(t, ctx, chromedp.Location()); !strings.HasSuffix(url, "/ui/login") {
		t.Fatalf("logged out, /ui/vm/%s went to %s, not the login", vm, url)
	}
	// A wrong token gets nothing.
	do(t, ctx, "wrong token", chromedp.SendKeys(chromedp.CSS("#token"), strings.Repeat("x", 43)), chromedp.Submit(chromedp.CSS("#token")),
		chromedp.WaitVisible(chromedp.CSS("p.error")))
	if sessionCookie(t, ctx) != nil {
		t.Fatal("a wrong token got a cookie")
	}
	do(t, ctx, "log in", chromedp.SetValue(chromedp.CSS("#token"), token), chromedp.Submit(chromedp.CSS("#token")),
		chromedp.WaitVisible(chromedp.CSS("#fleet")))
	c := sessionCookie(t, ctx)
	if c == nil || !c.HTTPOnly || !c.Secure || c.SameSite != network.CookieSameSiteStrict || c.Session {
		t.Fatalf("session cookie %+v: want HttpOnly, Secure, SameSite=Strict, with an expiry", c)
	}
	fleet := get(t, ctx, chromedp.Text(chromedp.CSS("#fleet")))
	if !strings.Contains(fleet, vm) || !strings.Contains(fleet, other) || !strings.Contains(fleet, "serving") || !strings.Contains(fleet, "never unlocked") {
		t.Fatalf("fleet page does not show %s serving and %s never unlocked:\n%s", vm, other, fleet)
	}
	shot(t, ctx, filepath.Join(art, "fleet.png"))

	do(t, ctx, "vm page", chromedp.Navigate(base+"/ui/vm/"+vm), chromedp.WaitVisible(chromedp.CSS("#timeline")))
	get(t, ctx, chromedp.Poll[bool](`document.getElementById("live").textContent === "live"`, chromedp.WithPollingTimeout(30*time.Second)))
	get(t, ctx, chromedp.Evaluate[bool](`window.kgMarker = 42; window.kgViolations = [];
		document.addEventListener("securitypolicyviolation", e => kgViolations.push(e.violatedDirective + " " + e.sample)); true`))

	pid, t0 := runAttack(t, key)
	get(t, ctx, chromedp.Poll[bool](fmt.Sprintf(`Array.from(document.querySelectorAll("#timeline tr.alert")).some(tr =>
			tr.querySelector("td.comm").textContent === %q && tr.textContent.includes("proc_mem"))`, attackComm),
		chromedp.WithPollingTimeout(60*time.Second), chromedp.WithPollingInterval(10*time.Millisecond)))
	latency := time.Since(t0)
	t.Logf("latency from the attack (pid %d opening /proc/%d/mem) to the alert on the VM page: %v", pid, os.Getpid(), latency.Round(time.Millisecond))

	const injected = `document.querySelectorAll("main svg, [onload]").length`
	if get(t, ctx, chromedp.Evaluate[int](`window.kgMarker || 0`)) != 42 {
		t.Fatal("the VM page reloaded: the alert must arrive without one")
	}
	svgs := get(t, ctx, chromedp.Evaluate[int](injected))
	violations := get(t, ctx, chromedp.Evaluate[[]string](`window.kgViolations`))
	html := get(t, ctx, chromedp.Evaluate[string](`document.querySelector("#timeline tbody").innerHTML`))
	if svgs != 0 || len(violations) != 0 || !strings.Contains(html, "&lt;svg/onload=1&gt;") {
		t.Fatalf("the process name did not stay text: %d svg/onload elements, CSP violations %q, timeline:\n%s", svgs, violations, html)
	}
	shot(t, ctx, filepath.Join(art, "vm.png"))
	do(t, ctx, "fleet after the attack", chromedp.Navigate(base+"/ui/"), chromedp.WaitVisible(chromedp.CSS("#fleet")))
	if n := get(t, ctx, chromedp.Evaluate[string](fmt.Sprintf(`Array.from(document.querySelectorAll("#fleet tbody tr")).find(tr => tr.dataset.vm === %q).querySelector("td.critical").textContent`, vm))); n != "1" {
		t.Fatalf("the fleet shows %q open critical alerts for %s, want 1", n, vm)
	}
	shot(t, ctx, filepath.Join(art, "fleet-after-attack.png"))
	do(t, ctx, "back to the vm page", chromedp.Navigate(base+"/ui/vm/"+vm), chromedp.WaitVisible(chromedp.CSS("#timeline")))

	// A second unlock in this boot is refused (PCR 15 was extended): the
	// denial and its PCR diff join the timeline.
	if _, err := boot.Run(context.Background(), boot.Config{KeysvcURL: "https://" + svc.VMAddr(), CA: ca, VM: vm, Image: img,
		TPM: tp, Log: quiet()}); err == nil {
		t.Fatal("a second unlock in the same boot was not refused")
	}

	// The server-rendered page shows it as text too.
	do(t, ctx, "vm page again", chromedp.Reload(), chromedp.WaitVisible(chromedp.CSS("#timeline")))
	if diff := get(t, ctx, chromedp.Text(chromedp.CSS("#timeline table.pcrdiff"))); !strings.Contains(diff, "15") {
		t.Fatalf("the denial's PCR diff does not name PCR 15: %q", diff)
	}
	html = get(t, ctx, chromedp.Evaluate[string](`document.querySelector("#timeline tbody").innerHTML`))
	if svgs := get(t, ctx, chromedp.Evaluate[int](injected)); svgs != 0 || !strings.Contains(html, "&lt;svg/onload=1&gt;") {
		t.Fatalf("server-rendered timeline does not show the process name as text (%d svg/onload elements):\n%s", svgs, html)
	}

	t1 := time.Now()
	do(t, ctx, "revoke", chromedp.Click(chromedp.CSS("#revoke")), chromedp.WaitVisible(chromedp.CSS("p.flash")))
	if state := get(t, ctx, chromedp.Text(chromedp.CSS("#state"))); !strings.Contains(state, "revoked") {
		t.Fatalf("after revoking, the VM page says %q", state)
	}
	select {
	case <-b.Done():
	case <-time.After(60 * time.Second):
		t.Fatal("the boot did not lock within 60s of the revoke")
	}
	if err := b.Wait(); !errors.Is(err, boot.ErrRevoked) {
		t.Fatalf("boot ended with %v, not the revoke", err)
	}
	t.Logf("revoke on the page to the boot locked: %v", time.Since(t1).Round(time.Millisecond))
	shot(t, ctx, filepath.Join(art, "vm-revoked.png"))
	do(t, ctx, "volumes", chromedp.Navigate(base+"/ui/volumes"), chromedp.WaitVisible(chromedp.CSS("#audit")))
	if a := get(t, ctx, chromedp.Text(chromedp.CSS("#audit"))); !strings.HasPrefix(a, "Verified") {
		t.Fatalf("the audit chain's state reads %q", a)
	}
	shot(t, ctx, filepath.Join(art, "volumes.png"))

	// The revoke is audited with the session as its actor.
	var recs []audit.Record
	if err := json.Unmarshal(adm.audit(), &recs); err != nil {
		t.Fatal(err)
	}
	if !slices.ContainsFunc(recs, func(r audit.Record) bool {
		return r.Action == audit.ActionRevoke && r.Subject == vm && strings.HasPrefix(r.Actor, "admin:ui:")
	}) {
		t.Fatalf("no revoke of %s with the dashboard session as actor in the audit chain", vm)
	}
}

func contains(rs []keymem.Range, r keymem.Range) bool {
	for _, x := range rs {
		if x == r {
			return true
		}
	}
	return false
}

// runAttack reads 64 bytes at addr of this process from a child named
// attackComm, and returns its pid and when it made the attempt.
func runAttack(t *testing.T, addr uint64) (int, time.Time) {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), fmt.Sprintf("%s=%d %#x 64", attackEnv, os.Getpid(), addr))
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("attacker: %v: %s", err, out)
	}
	t.Logf("attacker %d: %s", cmd.Process.Pid, strings.TrimSpace(string(out)))
	var at int64
	if _, err := fmt.Sscanf(string(out), "at=%d ", &at); err != nil {
		t.Fatalf("attacker output %q: %v", out, err)
	}
	return cmd.Process.Pid, time.Unix(0, at)
}

// browser starts headless Chromium with the flags this machine needs, a
// fresh profile, and the key service's certificate trusted by its key.
func browser(t *testing.T, chromium, addr string, ca []byte) (context.Context, context.CancelFunc) {
	t.Helper()
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(ca)
	conn, err := tls.Dial("tcp", addr, &tls.Config{RootCAs: pool})
	if err != nil {
		t.Fatal(err)
	}
	spki := sha256.Sum256(conn.ConnectionState().PeerCertificates[0].RawSubjectPublicKeyInfo)
	conn.Close()
	opts := append(chromedp.DefaultExecAllocatorOptions[:],
		chromedp.ExecPath(chromium), chromedp.NoSandbox, chromedp.DisableGPU, chromedp.NoFirstRun,
		chromedp.Flag("disable-quic", true), chromedp.Flag("disable-background-networking", true),
		chromedp.Flag("disable-component-update", true), chromedp.Flag("disable-sync", true),
		chromedp.UserDataDir(t.TempDir()), chromedp.WindowSize(1280, 900),
		chromedp.Flag("ignore-certificate-errors-spki-list", base64.StdEncoding.EncodeToString(spki[:])))
	actx, cancelA := chromedp.NewExecAllocator(context.Background(), opts...)
	ctx, cancelC := chromedp.NewContext(actx, chromedp.WithLogf(t.Logf))
	ctx, cancelT := context.WithTimeout(ctx, 5*time.Minute)
	if err := chromedp.Do(ctx); err != nil {
		cancelT()
		cancelC()
		cancelA()
		t.Fatalf("start chromium: %v", err)
	}
	return ctx, func() { cancelT(); cancelC(); cancelA() }
}

func do(t *testing.T, ctx context.Context, what string, steps ...chromedp.Action[chromedp.Void]) {
	t.Helper()
	sctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	if err := chromedp.Do(sctx, steps...); err != nil {
		body, _ := chromedp.Run(ctx, chromedp.Evaluate[string](`location.href + "\n" + document.body.innerText`))
		t.Fatalf("%s: %v; the page:\n%s", what, err, body)
	}
}

func get[T any](t *testing.T, ctx context.Context, a chromedp.Action[T]) T {
	t.Helper()
	v, err := chromedp.Run(ctx, a)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

func shot(t *testing.T, ctx context.Context, path string) {
	t.Helper()
	png := get(t, ctx, chromedp.FullScreenshot(100))
	if err := os.WriteFile(path, png, 0o644); err != nil {
		t.Fatal(err)
	}
	t.Logf("screenshot: %s", path)
}

// sessionCookie returns the dashboard's session cookie as the browser
// keeps it.
func sessionCookie(t *testing.T, ctx context.Context) *network.Cookie {
	t.Helper()
	res, err := chromedp.Call(ctx, network.GetCookies, network.GetCookiesParams{})
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range res.Cookies {
		if c.Name == "__Host-keygate-session" {
			return c
		}
	}
	return nil
}
