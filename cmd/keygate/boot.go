package main

import (
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/spf13/cobra"

	"github.com/keygate/keygate/boot"
	"github.com/keygate/keygate/disk"
	"github.com/keygate/keygate/ebpfmon"
	"github.com/keygate/keygate/internal/cli"
	"github.com/keygate/keygate/keysvc"
	"github.com/keygate/keygate/tpm"
)

func newBootCmd() *cobra.Command {
	var (
		cfg                   boot.Config
		caFile, fsType, alert string
		minSev                string
		monitor, rsa, asJSON  bool
		allowUIDs             []uint32
	)
	c := &cobra.Command{
		Use:   "boot --keysvc URL[,URL...] --ca FILE --vm NAME --volume ID --image PATH|DEVICE --tpm /dev/tpmrm0|swtpm:SOCKET|sim",
		Short: "Attest to the key service, unlock the volume and serve it over NBD or 9P",
		Long: `Unlock a keygate volume through remote attestation: the TPM quotes its PCRs
to the key service, which releases the volume's unwrap key sealed to this TPM
and this boot's PCR values. The key is imported into locked memory, the
volume is opened, PCR 15 is extended so the key cannot be released again in
this boot, and the volume is served one of two ways:

  --serve-nbd SOCKET [--attach /dev/nbd0]   the block device (for databases
      and any workload: the kernel runs its own ext4 on sectors keygate
      encrypts in user space; the key never enters the kernel)
        mount /dev/nbd0 /mnt                 with --attach (root, modprobe nbd)
        qemu-img convert -n disk.raw nbd+unix:///?socket=SOCKET
  --serve-9p SOCKET                          the filesystem as 9P2000.L, for
      file access without a block device
        mount -t 9p -o trans=unix,version=9p2000.L SOCKET /mnt

The two are exclusive: two writers would corrupt the volume. Sockets are
0600 from their first instant and admit only root, this process's user and
--allow-uid.

While the key service is unreachable at boot, keygate retries with backoff.
A denial prints the service's diagnostics (PCR, allowed and actual values)
and exits non-zero. While serving, the session is polled every --poll; a
revoke wipes the keys, closes the volume and stops serving.

With --monitor (root only), an eBPF monitor runs inside this process from
before the unlock: every attempt by another process to read its memory
(process_vm_readv, ptrace, /proc/PID/mem, ...) is logged and sent to the key
service. The first log line says whether attempts are only reported (detect
mode) or also denied (deny mode, with the BPF LSM active), and why.
--on-alert lock locks the volume, as a revoke does, on the first critical
alert.

--keysvc may list several replicas of one key service, separated by commas:
they are tried in order, starting with the one that answered last. A replica
that does not answer (refused, no TLS handshake within --connect-timeout,
5xx) costs that timeout and the next is tried; a denial from any replica is
final and is not asked of the others. The heartbeat fails over the same way.

While serving, the VM quotes its PCRs to the key service every --reattest
(default 5m) over its session; a quote off the VM's policy (a PCR extended
since the unlock, as a runtime measurement would) makes the service answer
"lock", and the volume is locked as for a revoke.

While the key service rotates the volume's unwrap key (keysvc volume rotate),
the unlock receives both keys: the image gets a keyslot under the new one and
loses the old one, without re-encrypting data, and the service then destroys
the old key. An interrupted rotation is resumed at the next boot.

--keysvc, --ca and --volume default to what the volume's keygate token says.
See docs/boot.md.`,
		Args: cobra.NoArgs,
		RunE: func(c *cobra.Command, _ []string) error {
			if cfg.VM == "" || cfg.Image == "" || cfg.TPMSpec == "" {
				return cli.Usagef(c, "--vm, --image and --tpm are required")
			}
			var err error
			if cfg.Reattest < 0 || cfg.Reattest > boot.MaxReattest {
				return cli.Usagef(c, "--reattest %s: use a positive duration up to %s, or 0 to turn re-attestation off", cfg.Reattest, boot.MaxReattest)
			}
			if alert != string(boot.AlertLog) && alert != string(boot.AlertLock) {
				return cli.Usagef(c, "--on-alert %q: use log or lock", alert)
			}
			if alert == string(boot.AlertLock) && !monitor {
				return cli.Usagef(c, "--on-alert lock needs --monitor (there are no alerts without the monitor)")
			}
			if cfg.Serve9P != "" && (cfg.ServeNBD != "" || cfg.Attach != "") {
				return cli.Usagef(c, "--serve-9p and --serve-nbd/--attach are exclusive: two writers (a kernel's ext4 and go-diskfs) would corrupt the volume; choose one")
			}
			if cfg.MonitorMinSeverity, err = ebpfmon.ParseSeverity(minSev); err != nil {
				return cli.Usagef(c, "--min-severity: %v", err)
			}
			cfg.AllowUIDs = allowUIDs
			cfg.Monitor, cfg.OnAlert = monitor, boot.AlertAction(alert)
			if cfg.InitFS, err = parseFS(fsType, false); err != nil {
				return cli.Usage(c, err)
			}
			if rsa {
				cfg.Alg = tpm.RSA
			}
			if caFile != "" {
				if cfg.CA, err = os.ReadFile(caFile); err != nil {
					return fmt.Errorf("read --ca: %w", err)
				}
			}
			var h slog.Handler = slog.NewTextHandler(c.ErrOrStderr(), nil)
			if asJSON {
				h = slog.NewJSONHandler(c.ErrOrStderr(), nil)
			}
			cfg.Log = slog.New(h)
			ctx, stop := signal.NotifyContext(c.Context(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			b, err := boot.Run(ctx, cfg)
			if err != nil {
				return err
			}
			select {
			case <-ctx.Done():
				cfg.Log.Info("stopping: flushing writes and wiping keys")
				return b.Close()
			case <-b.Done():
				err := b.Wait()
				b.Close()
				return err
			}
		},
	}
	f := c.Flags()
	f.StringVar(&cfg.KeysvcURL, "keysvc", "", "key service VM API URL, https://HOST:PORT, or several replicas' separated by commas (default: the volume's token)")
	f.DurationVar(&cfg.ConnectTimeout, "connect-timeout", 0, "connect and TLS handshake bound per replica before the next is tried (default 300ms with several URLs, 10s with one)")
	f.StringVar(&caFile, "ca", "", "key service CA certificate, its DATA/ca.pem (default: pin the token's CA fingerprint)")
	f.StringVar(&cfg.VM, "vm", "", "the name this VM is enrolled under")
	f.StringVar(&cfg.Volume, "volume", "", "volume ID at the key service (default: the volume's token)")
	f.StringVar(&cfg.Image, "image", "", "LUKS2 image file or block device")
	f.StringVar(&cfg.TPMSpec, "tpm", tpm.DefaultDevice, "TPM: /dev/tpmrm0, swtpm:SOCKET or sim")
	f.BoolVar(&rsa, "rsa", false, "use the RSA EK and AK instead of ECC")
	f.BoolVar(&cfg.InitIfBlank, "init-if-blank", false, "provision and format a blank image (no LUKS2 header, zeros at the start) through the key service")
	f.StringVar(&fsType, "fs", string(disk.Ext4), "filesystem --init-if-blank makes: ext4 or fat32")
	f.StringVar(&cfg.Serve9P, "serve-9p", "", "serve the filesystem as 9P2000.L on this unix socket")
	f.StringVar(&cfg.ServeNBD, "serve-nbd", "", "serve the volume as an NBD block device on this unix socket")
	f.StringVar(&cfg.Attach, "attach", "", "connect this kernel NBD device (/dev/nbdN) to the NBD export, then mount it (root, modprobe nbd)")
	allowUIDFlag(f, &allowUIDs)
	f.DurationVar(&cfg.Poll, "poll", boot.DefaultPoll, "session check period: a revoke locks the volume within this bound")
	f.DurationVar(&cfg.Reattest, "reattest", boot.DefaultReattest, "while serving, quote the PCRs to the key service this often; a PCR changed since the unlock locks the volume within this bound (0: off)")
	f.DurationVar(&cfg.MaxWait, "max-wait", 0, "give up when the key service is unreachable this long at boot (default: wait forever)")
	f.BoolVar(&monitor, "monitor", false, "watch, with eBPF, for other processes reading this one's memory (needs root); see docs/monitor.md")
	f.StringVar(&minSev, "min-severity", string(ebpfmon.Warning), "with --monitor: lowest severity of the alerts logged and sent to the key service: info, warning or critical (lower ones are counted only)")
	f.StringVar(&alert, "on-alert", "log", "with --monitor: log (report only), or lock (wipe the keys and stop serving on the first critical alert)")
	f.BoolVar(&asJSON, "json", false, "log JSON lines instead of text")
	return c
}

// keysvcCreate holds the admin-side flags of `disk create --keysvc`.
type keysvcCreate struct{ vm, ca, admin, tokenFile string }

func keysvcCreateFlags(c *cobra.Command, ks *keysvcCreate) {
	f := c.Flags()
	f.StringVar(&ks.vm, "vm", "", "with --keysvc: the VM the volume belongs to")
	f.StringVar(&ks.ca, "ca", "", "with --keysvc: the key service CA, DATA/ca.pem (env KEYSVC_CA)")
	f.StringVar(&ks.admin, "admin", "", "with --keysvc: admin API URL, or several replicas' separated by commas (env KEYSVC_SERVER; default https://"+keysvc.DefaultAdminListen+")")
	f.StringVar(&ks.tokenFile, "token-file", "", "with --keysvc: admin token file, DATA/admin.token (env KEYSVC_TOKEN_FILE)")
}

// createWithKeysvc is `disk create --keysvc URL --volume ID`.
func createWithKeysvc(c *cobra.Command, image, url, volume string, opts disk.CreateOptions, ks *keysvcCreate) (*disk.Created, error) {
	caFile := firstSet(ks.ca, os.Getenv("KEYSVC_CA"))
	tokenFile := firstSet(ks.tokenFile, os.Getenv("KEYSVC_TOKEN_FILE"))
	switch {
	case url == "" || volume == "":
		return nil, cli.Usagef(c, "--keysvc and --volume go together")
	case ks.vm == "":
		return nil, cli.Usagef(c, "--vm is required with --keysvc: the VM that may unlock the volume")
	case caFile == "":
		return nil, cli.Usagef(c, "--ca is required with --keysvc (the key service's DATA/ca.pem, or set KEYSVC_CA)")
	case tokenFile == "":
		return nil, cli.Usagef(c, "no admin token: pass --token-file DATA/admin.token or set KEYSVC_TOKEN_FILE")
	}
	ca, err := os.ReadFile(caFile)
	if err != nil {
		return nil, fmt.Errorf("read --ca: %w", err)
	}
	tok, err := os.ReadFile(tokenFile)
	if err != nil {
		return nil, fmt.Errorf("read admin token: %w", err)
	}
	defer clear(tok)
	return boot.CreateVolume(c.Context(), boot.CreateConfig{
		Image: image, KeysvcURL: url, AdminURL: firstSet(ks.admin, os.Getenv("KEYSVC_SERVER"), "https://"+keysvc.DefaultAdminListen),
		CA: ca, Token: strings.TrimSpace(string(tok)), VM: ks.vm, Volume: volume, Options: opts,
	})
}

func firstSet(s ...string) string {
	for _, x := range s {
		if x != "" {
			return x
		}
	}
	return ""
}
