package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/hugelgupf/p9/p9"
	"github.com/spf13/cobra"

	"github.com/keygate/keygate/attest"
	"github.com/keygate/keygate/boot"
	"github.com/keygate/keygate/disk"
	"github.com/keygate/keygate/disk/ninep"
	"github.com/keygate/keygate/internal/cli"
	"github.com/keygate/keygate/keysvc"
	"github.com/keygate/keygate/keysvc/api"
	"github.com/keygate/keygate/keysvc/client"
	"github.com/keygate/keygate/tpm"
)

func newDemoCmd() *cobra.Command {
	var (
		dir  string
		keep bool
	)
	c := &cobra.Command{
		Use:   "demo",
		Short: "Run the whole story on embedded defaults, in seconds",
		Long: `Walk through keygate on this machine, for real and without root: start a key
service (SQLite, HTTPS on loopback) in a temporary directory, enroll a VM
whose vTPM is the in-process TPM simulator, learn its policy from one
attested boot, create a volume and unlock it through attestation, write and
read files through the 9P server, show the key service refusing a changed
boot (naming the PCR), revoke the VM and watch the volume lock, then
crypto-erase the volume.

Everything happens in a temporary directory that is removed afterwards,
also on Ctrl-C (unless --dir names one, which is kept).

With --keep the key service stays up after the story, with its dashboard's
address and a login token printed, until Ctrl-C.`,
		Args: cobra.NoArgs,
		RunE: func(c *cobra.Command, _ []string) error {
			ctx, stop := signal.NotifyContext(c.Context(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			if dir != "" {
				if err := os.MkdirAll(dir, 0o700); err != nil {
					return fmt.Errorf("--dir: %w", err)
				}
				if ents, err := os.ReadDir(dir); err != nil {
					return fmt.Errorf("--dir: %w", err)
				} else if len(ents) > 0 {
					return cli.Usagef(c, "--dir %s is not empty: give a new or empty directory (the demo makes a key service and a volume there)", dir)
				}
			} else {
				// Short, so the 9P socket path fits in sun_path.
				d, err := os.MkdirTemp("", "keygate-demo-")
				if err != nil {
					return fmt.Errorf("make demo directory: %w (set TMPDIR to a writable directory)", err)
				}
				defer os.RemoveAll(d)
				dir = d
			}
			err := runDemo(ctx, c.OutOrStdout(), dir, keep)
			if ctx.Err() != nil && (err != nil || !keep) {
				return fmt.Errorf("demo interrupted; everything it started was stopped and its directory removed")
			}
			return err
		},
	}
	c.Flags().StringVar(&dir, "dir", "", "work in this directory instead of a temporary one (kept afterwards)")
	c.Flags().BoolVar(&keep, "keep", false, "leave the key service running afterwards, with its dashboard's URL and a login token printed, until Ctrl-C")
	return c
}

// Names the demo uses at its key service.
const (
	demoVM     = "demo-vm"
	demoVolume = "demo-data"
	demoPoll   = time.Second // heartbeat period: a revoke locks within this
)

// demo is the state the steps share: one key service, one simulated TPM
// (the simulator is one per process) and the volume's current boot.
type demo struct {
	ctx    context.Context
	out    io.Writer
	dir    string
	start  time.Time
	step   int
	svc    *keysvc.Service
	ca     []byte
	token  string
	admin  *client.Client // the admin API
	tp     *tpm.TPM
	image  string
	sock   string
	b      *boot.Boot
	events chan boot.Event
	quiet  *slog.Logger
	monErr error // why the monitor is off although this is root
}

func runDemo(ctx context.Context, out io.Writer, dir string, keep bool) error {
	d := &demo{ctx: ctx, out: out, dir: dir, start: time.Now(), events: make(chan boot.Event, 64),
		quiet: slog.New(slog.DiscardHandler)}
	defer d.close()
	fmt.Fprintf(out, "keygate demo: the whole story on this machine, in %s\n", dir)
	for _, s := range []func() error{d.service, d.enroll, d.unlock, d.files, d.monitor, d.denial, d.revoke, d.erase} {
		if err := ctx.Err(); err != nil {
			return err
		}
		if err := s(); err != nil {
			return err
		}
	}
	// A real TPM has few object slots: every boot must flush what it loaded.
	if h, err := d.tp.TransientHandles(); err != nil || len(h) > 0 {
		return fmt.Errorf("demo: TPM objects left loaded after the story: %v %v", h, err)
	}
	if keep {
		return d.keep()
	}
	fmt.Fprintf(out, "\ndemo complete in %.1f s; removing what it made.\n", time.Since(d.start).Seconds())
	return nil
}

// keep leaves the key service running until Ctrl-C, for its dashboard.
func (d *demo) keep() error {
	fmt.Fprintf(d.out, "\ndemo complete in %.1f s; the key service keeps running (Ctrl-C stops it and removes what the demo made).\n", time.Since(d.start).Seconds())
	fmt.Fprintf(d.out, "  dashboard:   https://%s/ui/\n", d.svc.AdminAddr())
	fmt.Fprintf(d.out, "  CA:          %s (the demo's own: trust it in the browser, or accept its warning)\n", d.svc.Data.Path(keysvc.CAFile))
	fmt.Fprintf(d.out, "  admin token: %s\n", d.token)
	<-d.ctx.Done()
	return nil
}

func (d *demo) close() {
	if d.b != nil {
		d.b.Close()
	}
	if d.tp != nil {
		d.tp.Close()
	}
	if d.admin != nil {
		d.admin.Close()
	}
	if d.svc != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		d.svc.Shutdown(ctx)
		cancel()
	}
}

// say starts step n with a headline, then prints its detail lines.
func (d *demo) say(headline string, lines ...string) {
	d.step++
	fmt.Fprintf(d.out, "\n==> %d. %s\n", d.step, headline)
	d.more(lines...)
}

func (d *demo) more(lines ...string) {
	for _, l := range lines {
		if l == "" {
			continue
		}
		fmt.Fprintf(d.out, "    %s\n", strings.ReplaceAll(l, "\n", "\n    "))
	}
}

func (d *demo) service() error {
	var err error
	d.svc, err = keysvc.Start(d.ctx, keysvc.Config{DataDir: filepath.Join(d.dir, "keysvc"), Listen: "127.0.0.1:0", AdminListen: "127.0.0.1:0", Logger: d.quiet})
	if err != nil {
		return fmt.Errorf("start the key service: %w", err)
	}
	if d.ca, err = os.ReadFile(filepath.Join(d.dir, "keysvc", keysvc.CAFile)); err != nil {
		return err
	}
	tok, err := os.ReadFile(filepath.Join(d.dir, "keysvc", keysvc.AdminTokenFile))
	if err != nil {
		return err
	}
	d.token = strings.TrimSpace(string(tok))
	if d.admin, err = client.New(client.Config{URLs: []string{"https://" + d.svc.AdminAddr()}, CA: d.ca, Token: d.token}); err != nil {
		return err
	}

	d.tp, err = tpm.Open("sim")
	if err != nil {
		return fmt.Errorf("open the TPM simulator: %w (the demo needs a keygate built with cgo and libssl-dev)", err)
	}
	d.say("start the key service and the VM's TPM",
		fmt.Sprintf("keysvc: VM API https://%s, admin API https://%s, SQLite and its own CA in keysvc/", d.svc.VMAddr(), d.svc.AdminAddr()),
		"TPM: the in-process simulator stands in for the VM's vTPM (a cloud VM would use /dev/tpmrm0)")
	return nil
}

func (d *demo) enroll() error {
	ek, err := d.tp.EK(tpm.ECC)
	if err != nil {
		return err
	}
	ak, err := d.tp.AK(tpm.ECC)
	if err != nil {
		return err
	}
	ekPEM, err := ek.PEM()
	if err != nil {
		return err
	}
	akPEM, err := ak.PEM()
	if err != nil {
		return err
	}
	if _, err := d.admin.EnrollVM(d.ctx, api.EnrollRequest{Name: demoVM, EKPub: string(ekPEM), AKPub: string(akPEM)}); err != nil {
		return fmt.Errorf("enroll %s: %w", demoVM, err)
	}
	if err := d.admin.LearnPolicy(d.ctx, demoVM); err != nil {
		return fmt.Errorf("arm learn mode: %w", err)
	}
	fp, _ := attest.KeyFingerprint(ek.Key)
	d.say("enroll the VM and arm learn mode",
		fmt.Sprintf("%s enrolled with its TPM's EK (sha256 %x…) and AK: only this TPM can receive its keys", demoVM, fp[:8]),
		"learn mode: the PCR values of the VM's next attested boot become its policy")
	return nil
}

func (d *demo) unlock() error {
	d.image = filepath.Join(d.dir, "volume.img")
	d.sock = filepath.Join(d.dir, "9p")
	res, err := boot.CreateVolume(d.ctx, boot.CreateConfig{Image: d.image, KeysvcURL: "https://" + d.svc.VMAddr(),
		AdminURL: "https://" + d.svc.AdminAddr(), CA: d.ca, Token: d.token, VM: demoVM, Volume: demoVolume,
		Options: disk.CreateOptions{Size: 64 << 20, FS: disk.Ext4, Label: "demo"}})
	if err != nil {
		return err
	}
	res.Wipe()
	lines := []string{"volume.img: 64 MiB LUKS2 with ext4; its unwrap key (UK) was made in locked memory and handed to keysvc, never written to disk"}
	if cs, err := exec.LookPath("cryptsetup"); err != nil {
		lines = append(lines, "cryptsetup is not installed (apt-get install cryptsetup-bin), so its cross-check is skipped")
	} else if b, err := exec.CommandContext(d.ctx, cs, "luksDump", d.image).CombinedOutput(); err != nil {
		return fmt.Errorf("cryptsetup luksDump: %v: %s", err, b)
	} else {
		l := "cryptsetup luksDump reads it as standard LUKS2"
		if bytes.Contains(b, []byte("keygate")) {
			l += ", keygate token included"
		}
		lines = append(lines, l)
	}

	cfg := boot.Config{KeysvcURL: "https://" + d.svc.VMAddr(), CA: d.ca, VM: demoVM, Image: d.image,
		TPM: d.tp, Serve9P: d.sock, Poll: demoPoll, Log: d.quiet, OnEvent: d.onEvent, Monitor: os.Geteuid() == 0}
	t0 := time.Now()
	d.b, err = boot.Run(d.ctx, cfg)
	var r *boot.Refusal
	if err != nil && cfg.Monitor && !errors.As(err, &r) && d.ctx.Err() == nil {
		// The monitor starts before anything is released, so booting
		// again without it is safe; the monitor step says why it is off.
		d.monErr, cfg.Monitor = err, false
		t0 = time.Now()
		if d.b, err = boot.Run(d.ctx, cfg); err != nil {
			return fmt.Errorf("unlock: %w (and with the monitor: %v)", err, d.monErr)
		}
	}
	if err != nil {
		return fmt.Errorf("unlock: %w", err)
	}
	took := time.Since(t0)
	pol, err := d.policy()
	if err != nil {
		return err
	}
	lines = append(lines, fmt.Sprintf("unlocked in %d ms: TPM quote -> keysvc checks it -> UK sealed to this TPM -> TPM Import -> keyslot -> ext4", took.Milliseconds()))
	if cfg.Monitor {
		lines = append(lines, "(that includes loading the key-page monitor's BPF programs first, so the keys were watched from the moment they existed)")
	}
	lines = append(lines, fmt.Sprintf("learned policy: PCRs %s; PCR %d then extended (\"unlock done\") so this boot can't unlock again",
		joinInts(slices.Sorted(maps.Keys(pol.PCRs))), tpm.WindowPCR))
	if _, ok := pol.PCRs[tpm.WindowPCR]; !ok {
		// docs/boot.md: every policy must pin the window PCR at zero.
		pol.PCRs[tpm.WindowPCR] = [][]byte{make([]byte, 32)}
		if err := d.admin.SetPolicy(d.ctx, demoVM, pol); err != nil {
			return fmt.Errorf("add PCR %d to the policy: %w", tpm.WindowPCR, err)
		}
		lines = append(lines, fmt.Sprintf("learn mode left out PCR %d; the demo adds it at zero, as docs/boot.md asks of every policy", tpm.WindowPCR))
	}
	d.say("create a volume and unlock it through attestation", lines...)
	return nil
}

func (d *demo) onEvent(e boot.Event) {
	select {
	case d.events <- e:
	default:
	}
}

func (d *demo) files() error {
	secret := []byte("Quarterly numbers, not for the cloud provider's eyes.\n")
	err := d.with9P(func(root p9.File) error {
		if _, err := root.Mkdir("reports", 0o755, p9.NoUID, p9.NoGID); err != nil {
			return fmt.Errorf("mkdir /reports: %w", err)
		}
		return ninep.WriteFile(root, "/reports/q3.txt", secret)
	})
	if err != nil {
		return fmt.Errorf("write over 9P: %w", err)
	}
	var got []byte
	err = d.with9P(func(root p9.File) (err error) {
		got, err = ninep.ReadFile(root, "/reports/q3.txt")
		return err
	})
	if err != nil {
		return fmt.Errorf("read over 9P: %w", err)
	}
	if !bytes.Equal(got, secret) {
		return errors.New("demo: 9P read back different bytes than were written")
	}
	whole, err := os.ReadFile(d.image)
	if err != nil {
		return err
	}
	if bytes.Contains(whole, secret[:20]) || bytes.Contains(whole, []byte("q3.txt")) {
		return errors.New("demo: plaintext is visible in the image file")
	}
	d.say("write and read files through the 9P server",
		fmt.Sprintf("wrote /reports/q3.txt through the unix socket %s: 9P2000.L, which a kernel mounts with mount -t 9p -o trans=unix,version=9p2000.L", filepath.Base(d.sock)),
		fmt.Sprintf("read back on a new connection: %q", got),
		fmt.Sprintf("volume.img (%d bytes) holds neither the text nor the file name: only ciphertext reaches the disk", len(whole)))
	return nil
}

func (d *demo) with9P(f func(root p9.File) error) error {
	root, hangup, err := ninep.Dial(d.sock)
	if err != nil {
		return err
	}
	return errors.Join(f(root), hangup())
}

func (d *demo) denial() error {
	d.say("a changed boot is refused, and the key service says why")
	r, err := d.tryUnlock()
	if err != nil {
		return err
	}
	d.more("a second unlock in the same boot (as later code, or an attacker, would try) is refused:")
	d.more(diagnostics(r)...)

	// Reboot the VM's TPM (PCRs back to their reset values, EK kept), then
	// measure something new into PCR 7, as a boot loader the policy has
	// never seen would. The volume unlocked earlier keeps serving: it no
	// longer needs the TPM.
	if err := d.tp.Reboot(); err != nil {
		return err
	}
	if err := d.tp.Extend(7, []byte("keygate demo: a boot loader the policy has never seen")); err != nil {
		return err
	}
	if r, err = d.tryUnlock(); err != nil {
		return err
	}
	if r.Denial == nil || !slices.ContainsFunc(r.Denial.Mismatches, func(m attest.PCRMismatch) bool { return m.PCR == 7 }) {
		return fmt.Errorf("demo: after PCR 7 changed, the refusal does not name PCR 7: %v", r)
	}
	d.more("after a reboot into a changed boot (PCR 7: a different boot loader or Secure Boot setting), the service names it:")
	d.more(diagnostics(r)...)
	d.more("no key was released either time; the volume unlocked earlier keeps serving")
	return nil
}

// tryUnlock runs a boot that must be refused, and returns the refusal.
func (d *demo) tryUnlock() (*boot.Refusal, error) {
	b, err := boot.Run(d.ctx, boot.Config{KeysvcURL: "https://" + d.svc.VMAddr(), CA: d.ca, VM: demoVM, Image: d.image, TPM: d.tp, Log: d.quiet})
	if err == nil {
		b.Close()
		return nil, errors.New("demo: the key service released the key although it should have refused")
	}
	var r *boot.Refusal
	if !errors.As(err, &r) {
		return nil, err
	}
	return r, nil
}

// diagnostics are a refusal's lines, with values cut to stay readable.
func diagnostics(r *boot.Refusal) []string {
	if r.Denial == nil {
		return []string{"key service: " + r.Error()}
	}
	out := []string{fmt.Sprintf("key service: refused (%s): %s", r.Reason, r.Denial.Reason)}
	for _, m := range r.Denial.Mismatches {
		if m.Missing {
			out = append(out, fmt.Sprintf("  PCR %d: not in the quote", m.PCR))
			continue
		}
		allowed := make([]string, len(m.Allowed))
		for i, a := range m.Allowed {
			allowed[i] = short(a)
		}
		out = append(out, fmt.Sprintf("  PCR %d: allowed %s, got %s", m.PCR, strings.Join(allowed, " or "), short(m.Got)))
	}
	return out
}

func short(h string) string {
	if len(h) > 16 {
		return h[:16] + "…"
	}
	return h
}

func (d *demo) revoke() error {
	t0 := time.Now()
	if _, err := d.admin.Revoke(d.ctx, demoVM); err != nil {
		return fmt.Errorf("revoke: %w", err)
	}
	select {
	case <-d.b.Done():
	case <-time.After(10 * demoPoll):
		return fmt.Errorf("demo: the volume was not locked within %s of the revoke", 10*demoPoll)
	case <-d.ctx.Done():
		return d.ctx.Err()
	}
	took := time.Since(t0).Round(time.Millisecond)
	if err := d.b.Wait(); !errors.Is(err, boot.ErrRevoked) {
		return fmt.Errorf("demo: the boot ended with %v, not a revoke", err)
	}
	_, derr := net.Dial("unix", d.sock)
	if derr == nil {
		return errors.New("demo: the 9P socket still answers after the revoke")
	}
	d.say("revoke the VM: the volume locks",
		fmt.Sprintf("keysvc revoke --vm %s; the VM's next heartbeat (every %s) heard it: locked %s later", demoVM, demoPoll, took),
		"keys wiped from locked memory, volume closed, 9P socket gone (dial: "+lastPart(derr)+")")
	return nil
}

func (d *demo) erase() error {
	if _, err := d.admin.Erase(d.ctx, demoVolume); err != nil {
		return fmt.Errorf("erase: %w", err)
	}
	vi, err := d.admin.Volume(d.ctx, demoVolume)
	if err != nil {
		return err
	}
	if !vi.Erased {
		return errors.New("demo: the key service does not report the volume erased")
	}
	r, err := d.tryUnlock()
	if err != nil {
		return err
	}
	info, err := disk.Inspect(d.image)
	if err != nil {
		return err
	}
	av, err := d.admin.AuditVerify(d.ctx)
	if err != nil {
		return err
	}
	if !av.OK {
		return fmt.Errorf("demo: the audit chain does not verify: %v", av.Problems)
	}
	d.say("crypto-erase the volume: it can never be opened again",
		fmt.Sprintf("keysvc erase --volume %s: the UK is destroyed (audited); the service now shows it erased: %v", demoVolume, vi.Erased),
		fmt.Sprintf("a boot is refused (%s, as the VM is revoked too); %s, so no one can open it again: its data is gone for good",
			r.Reason, slotsLine(len(info.Keyslots))),
		fmt.Sprintf("audit: %d hash-chained records of all of the above (enroll, learn, unlock, denials, revoke, erase) verify", av.Records))
	return nil
}

func (d *demo) monitor() error {
	switch {
	case os.Geteuid() != 0:
		d.say("the key-page monitor (ebpfmon)",
			"skipped: watching who reads the key pages needs root and BPF; as root, try `keygate boot --monitor` (docs/monitor.md)")
		return nil
	case d.monErr != nil:
		d.say("the key-page monitor (ebpfmon)", "skipped: it could not start here: "+d.monErr.Error())
		return nil
	}
	var mode string
	for len(d.events) > 0 {
		if e := <-d.events; e.Kind == boot.EventMonitoring {
			mode = e.Message
		}
	}
	dd, err := exec.LookPath("dd")
	if err != nil {
		d.say("the key-page monitor (ebpfmon)", mode, "skipped the alert: dd is not installed to play the attacker")
		return nil
	}
	// Another process opens this one's memory, as a memory-scraping
	// attacker with root would. Whether dd succeeds (detect mode) or is
	// refused (deny mode), the alert is what the step shows.
	mem := fmt.Sprintf("/proc/%d/mem", os.Getpid())
	_ = exec.CommandContext(d.ctx, dd, "if="+mem, "of=/dev/null", "bs=1", "count=0", "status=none").Run()
	timeout := time.After(5 * time.Second)
	for {
		select {
		case e := <-d.events:
			if e.Kind != boot.EventAlert || e.Alert == nil || e.Alert.TGID == os.Getpid() {
				continue
			}
			d.say("the key-page monitor (ebpfmon) catches a read of the key holder's memory", mode,
				fmt.Sprintf("`dd if=%s` from another process raised: %s", mem, e.Message))
			return nil
		case <-timeout:
			return fmt.Errorf("demo: the monitor reported no alert within 5 s of `dd if=%s`", mem)
		case <-d.ctx.Done():
			return d.ctx.Err()
		}
	}
}

// policy reads the VM's policy from the admin API.
func (d *demo) policy() (*attest.Policy, error) {
	var p attest.Policy
	if err := d.admin.Policy(d.ctx, demoVM, &p); err != nil {
		return nil, fmt.Errorf("read the learned policy: %w", err)
	}
	if p.PCRs == nil {
		return nil, errors.New("demo: learn mode captured no PCRs")
	}
	return &p, nil
}

func slotsLine(n int) string {
	if n == 1 {
		return "the image's only keyslot takes that UK as its passphrase"
	}
	return fmt.Sprintf("all %d of the image's keyslots take that UK as their passphrase", n)
}

// lastPart is the innermost part of an error message ("no such file or
// directory"), enough for a one-line report.
func lastPart(err error) string {
	s := err.Error()
	if i := strings.LastIndex(s, ": "); i >= 0 {
		return s[i+2:]
	}
	return s
}

func joinInts(v []int) string {
	s := make([]string, len(v))
	for i, n := range v {
		s[i] = strconv.Itoa(n)
	}
	return strings.Join(s, ",")
}
