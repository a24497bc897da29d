// Command kgvm boots the keygate test guest by hand, for debugging: it
// builds the guest as the tests do (kernel and modules from the testvm
// cache, a static keygate, the default /init), starts swtpm and QEMU, and
// connects the serial console to the terminal. See docs/testvm.md.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"time"

	"github.com/keygate/keygate/testvm"
)

var (
	tpmState string
	fwItems  = map[string][]byte{}
)

func main() {
	shell := flag.Bool("shell", false, "start a shell on the serial console after /init's checks (power off with 'poweroff -f')")
	script := flag.String("script", "", "shell script that /init runs (delivered through fw_cfg, so not measured)")
	data := flag.String("data", "", "raw image to attach as the data disk (/dev/vda), e.g. one made with 'keygate disk create'")
	extra := flag.String("append", "", "extra kernel arguments, after "+testvm.BaseCmdline)
	print := flag.Bool("print", false, "build the guest, then print the swtpm and qemu commands instead of running them")
	timeout := flag.Duration("timeout", 0, "kill the guest after this long (0: never)")
	flag.StringVar(&tpmState, "tpm", "", "swtpm state directory to keep across boots (the same EK and AK every boot); a fresh TPM when empty")
	flag.Func("fwcfg", "NAME=FILE: hand FILE to the guest as fw_cfg item NAME, read with 'fwcfg NAME' (repeatable; e.g. ca=DATA/ca.pem)", func(v string) error {
		name, file, ok := strings.Cut(v, "=")
		if !ok || name == "" || file == "" {
			return fmt.Errorf("want NAME=FILE, got %q", v)
		}
		b, err := os.ReadFile(file)
		if err != nil {
			return err
		}
		fwItems[name] = b
		return nil
	})
	flag.Parse()
	if err := run(*shell, *script, *data, *extra, *print, *timeout); err != nil {
		fmt.Fprintln(os.Stderr, "kgvm:", err)
		os.Exit(1)
	}
}

func run(shell bool, script, data, extra string, print bool, timeout time.Duration) error {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	cache, err := testvm.CacheDir()
	if err != nil {
		return err
	}
	dir := filepath.Join(cache, "kgvm")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	t0 := time.Now()
	g, err := testvm.PrepareGuest(ctx, dir)
	if err != nil {
		return err
	}
	initrd := filepath.Join(dir, "initrd.cpio")
	if err := g.WriteInitramfs(initrd, nil); err != nil {
		return err
	}
	fmt.Fprintf(os.Stderr, "kgvm: guest ready in %v: kernel %s %s, initrd %s\n", time.Since(t0).Round(time.Millisecond), g.Kernel.Package, g.Kernel.Version, initrd)
	cfg := g.Config(initrd)
	if extra != "" {
		cfg.Cmdline += " " + extra
	}
	cfg.DataDisk, cfg.SwtpmState = data, tpmState
	cfg.FwCfg = fwItems
	if script != "" {
		b, err := os.ReadFile(script)
		if err != nil {
			return err
		}
		cfg.FwCfg["script"] = b
	}
	if shell {
		cfg.FwCfg["shell"] = []byte("1")
		cfg.Stdin = os.Stdin
	}
	if print {
		vars := filepath.Join(dir, "OVMF_VARS.fd")
		args, err := testvm.QEMUArgs(cfg, dir, vars, "/tmp/kgvm-tpm/ctrl")
		if err != nil {
			return err
		}
		fmt.Printf("cp %s %s\n", g.Firmware.Vars, vars)
		fmt.Printf("mkdir -p /tmp/kgvm-tpm && swtpm socket --tpm2 --tpmstate dir=/tmp/kgvm-tpm --ctrl type=unixio,path=/tmp/kgvm-tpm/ctrl --terminate &\n")
		fmt.Printf("qemu-system-x86_64 %s\n", shellQuote(args))
		return nil
	}
	cfg.Console = os.Stdout
	vm, err := testvm.Start(cfg)
	if err != nil {
		return err
	}
	defer vm.Close()
	if timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, timeout)
		defer cancel()
	}
	err = vm.Wait(ctx)
	if at, ok := vm.Console.At("userspace_uptime"); ok {
		fmt.Fprintf(os.Stderr, "kgvm: /init started %v after QEMU (kernel uptime %ss)\n", at.Round(time.Millisecond), vm.Console.Results()["userspace_uptime"])
	}
	return err
}

func shellQuote(args []string) string {
	q := make([]string, len(args))
	for i, a := range args {
		if a == "" || strings.ContainsAny(a, " \t'\"$&;|<>()*?") {
			a = "'" + strings.ReplaceAll(a, "'", `'\''`) + "'"
		}
		q[i] = a
	}
	return strings.Join(q, " ")
}
