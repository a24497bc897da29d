package testvm

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"time"
)

// Firmware is an OVMF build: the read-only code and a template of the
// variable store, which each VM gets a fresh copy of.
type Firmware struct {
	Code, Vars string
}

// ovmfCandidates are Debian's ovmf builds with TPM 2.0 support, best first.
// The 2 MB build boots in about 20% less CPU time than the 4 MB one under
// TCG, and measures the same way.
var ovmfCandidates = []Firmware{
	{"/usr/share/OVMF/OVMF_CODE.fd", "/usr/share/OVMF/OVMF_VARS.fd"},
	{"/usr/share/OVMF/OVMF_CODE_4M.fd", "/usr/share/OVMF/OVMF_VARS_4M.fd"},
}

// ErrNoFirmware means no OVMF build is installed.
var ErrNoFirmware = errors.New("no OVMF firmware found (install ovmf)")

// FindOVMF returns the installed OVMF build without Secure Boot (the test
// kernel's EFI stub is signed, but the guest needs no db to boot).
func FindOVMF() (Firmware, error) {
	for _, f := range ovmfCandidates {
		if _, err := os.Stat(f.Code); err != nil {
			continue
		}
		if _, err := os.Stat(f.Vars); err != nil {
			continue
		}
		return f, nil
	}
	return Firmware{}, ErrNoFirmware
}

// BaseCmdline is the kernel command line every guest starts from: the
// serial console the host reads, and the BPF LSM among the active LSMs.
const BaseCmdline = "console=ttyS0 lsm=lockdown,yama,bpf panic=-1 loglevel=4"

// Config describes one guest run.
type Config struct {
	Firmware Firmware
	Kernel   string // bzImage (EFI stub) path
	Initrd   string // initramfs path
	Cmdline  string // BaseCmdline when empty
	// DataDisk is a raw image attached as a virtio disk (/dev/vda in the
	// guest); none when empty.
	DataDisk string
	// Share is a host directory the guest can mount with the kernel's 9p
	// client over virtio (mount -t 9p -o trans=virtio host /mnt); none when
	// empty. It is for tests to hand files in and out, not part of the
	// product's path, which reaches the host only through the network.
	Share string
	// FwCfg are per-run inputs the firmware does not measure, readable in
	// the guest at /sys/firmware/qemu_fw_cfg/by_name/opt/keygate/NAME/raw.
	// init.sh runs "script" and starts a shell when "shell" is present.
	FwCfg map[string][]byte
	// MemoryMiB defaults to 1024, CPUs to 1: under TCG on a shared
	// 2-core machine a second vCPU costs more CPU time than it saves.
	// QEMU writes the initrd's load address, which depends on the memory
	// size, into the kernel before OVMF measures it: boots compared by
	// PCR 4 need the same MemoryMiB.
	MemoryMiB, CPUs int
	// KVM asks for hardware acceleration; the default is TCG, since KVM
	// hung on the machines this was written on.
	KVM bool
	// Console, when set, receives a live copy of the guest's console.
	Console io.Writer
	// Stdin, when set, is the serial console's input (a debug shell).
	Stdin io.Reader
	// Swtpm, when set, is an existing swtpm state directory (a TPM that
	// persists across boots); a fresh TPM otherwise.
	SwtpmState string
}

// VM is a running guest: QEMU with OVMF, and the swtpm behind its vTPM.
type VM struct {
	Console *Console
	dir     string
	qemu    *exec.Cmd
	swtpm   *exec.Cmd
	qdone   chan struct{}
	qerr    error
	qstderr *strings.Builder
	sdone   chan struct{}
}

// Start starts swtpm and QEMU. The caller must Close the VM, which kills
// what is still running and removes its files.
func Start(cfg Config) (*VM, error) {
	qemuBin, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		return nil, fmt.Errorf("find qemu-system-x86_64: %w (install qemu-system-x86)", err)
	}
	swtpmBin, err := exec.LookPath("swtpm")
	if err != nil {
		return nil, fmt.Errorf("find swtpm: %w (install swtpm)", err)
	}
	// Unix socket paths must stay short (108 bytes), so not t.TempDir.
	dir, err := os.MkdirTemp("", "kgvm")
	if err != nil {
		return nil, err
	}
	v := &VM{dir: dir, qdone: make(chan struct{}), sdone: make(chan struct{}), qstderr: &strings.Builder{}}
	if err := v.start(cfg, qemuBin, swtpmBin); err != nil {
		v.Close()
		return nil, err
	}
	return v, nil
}

func (v *VM) start(cfg Config, qemuBin, swtpmBin string) error {
	state := cfg.SwtpmState
	if state == "" {
		state = filepath.Join(v.dir, "tpm")
		if err := os.Mkdir(state, 0o700); err != nil {
			return err
		}
	}
	ctrl := filepath.Join(v.dir, "tpm.sock")
	// No startup flag: the firmware sends TPM2_Startup, as on real hardware.
	// --terminate ends swtpm when QEMU goes away, should Close never run.
	v.swtpm = exec.Command(swtpmBin, "socket", "--tpm2", "--tpmstate", "dir="+state,
		"--ctrl", "type=unixio,path="+ctrl, "--terminate")
	var serr strings.Builder
	v.swtpm.Stderr = &serr
	v.swtpm.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := v.swtpm.Start(); err != nil {
		close(v.sdone)
		return fmt.Errorf("start swtpm: %w", err)
	}
	go func() { v.swtpm.Wait(); close(v.sdone) }()
	if err := waitSocket(ctrl, v.sdone); err != nil {
		v.swtpm.Process.Kill()
		<-v.sdone // serr is complete, and no longer written, only now
		return fmt.Errorf("swtpm: %w: %s", err, strings.TrimSpace(serr.String()))
	}

	vars := filepath.Join(v.dir, "OVMF_VARS.fd")
	if err := copyFile(cfg.Firmware.Vars, vars); err != nil {
		return fmt.Errorf("copy OVMF variables: %w", err)
	}
	args, err := v.qemuArgs(cfg, vars, ctrl)
	if err != nil {
		return err
	}
	v.qemu = exec.Command(qemuBin, args...)
	v.qemu.Stdin = cfg.Stdin
	v.qemu.Stderr = v.qstderr
	v.qemu.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	out, err := v.qemu.StdoutPipe()
	if err != nil {
		return err
	}
	if err := v.qemu.Start(); err != nil {
		close(v.qdone)
		return fmt.Errorf("start qemu: %w", err)
	}
	v.Console = NewConsole(out, cfg.Console)
	go func() {
		// Wait closes the pipe only after the console has read it all.
		<-v.Console.Done()
		v.qerr = v.qemu.Wait()
		close(v.qdone)
	}()
	return nil
}

// QEMUArgs returns the QEMU command line for cfg, with the firmware
// variables at vars and swtpm's control socket at ctrl, for running a guest
// by hand (see docs/testvm.md). FwCfg items are written under dir.
func QEMUArgs(cfg Config, dir, vars, ctrl string) ([]string, error) {
	v := &VM{dir: dir}
	return v.qemuArgs(cfg, vars, ctrl)
}

func (v *VM) qemuArgs(cfg Config, vars, ctrl string) ([]string, error) {
	cmdline := cfg.Cmdline
	if cmdline == "" {
		cmdline = BaseCmdline
	}
	mem, cpus := cfg.MemoryMiB, cfg.CPUs
	if mem == 0 {
		mem = 1024
	}
	if cpus == 0 {
		cpus = 1
	}
	accel := "tcg,thread=multi"
	cpu := "max"
	if cfg.KVM {
		accel, cpu = "kvm", "host"
	}
	args := []string{
		"-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
		"-machine", "q35,smm=off", "-accel", accel, "-cpu", cpu,
		"-m", fmt.Sprint(mem), "-smp", fmt.Sprint(cpus),
		"-drive", "if=pflash,format=raw,unit=0,readonly=on,file=" + cfg.Firmware.Code,
		"-drive", "if=pflash,format=raw,unit=1,file=" + vars,
		"-kernel", cfg.Kernel, "-initrd", cfg.Initrd, "-append", cmdline,
		"-chardev", "socket,id=chrtpm,path=" + ctrl,
		"-tpmdev", "emulator,id=tpm0,chardev=chrtpm",
		"-device", "tpm-crb,tpmdev=tpm0",
		"-netdev", "user,id=net0",
		"-device", "virtio-net-pci,netdev=net0,romfile=",
		"-serial", "stdio", "-monitor", "none",
	}
	if cfg.DataDisk != "" {
		args = append(args, "-drive", "if=none,id=data,format=raw,file="+cfg.DataDisk,
			"-device", "virtio-blk-pci,drive=data")
	}
	if cfg.Share != "" {
		if strings.Contains(cfg.Share, ",") {
			return nil, fmt.Errorf("share %q: QEMU cannot take a path with a comma", cfg.Share)
		}
		args = append(args, "-virtfs", "local,path="+cfg.Share+",mount_tag=host,security_model=none,id=share")
	}
	names := make([]string, 0, len(cfg.FwCfg))
	for n := range cfg.FwCfg {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		if strings.ContainsAny(n, "/,=") || n == "" {
			return nil, fmt.Errorf("fw_cfg item name %q: use one word without '/', ',' or '='", n)
		}
		p := filepath.Join(v.dir, "fwcfg-"+n)
		if err := os.WriteFile(p, cfg.FwCfg[n], 0o600); err != nil {
			return nil, err
		}
		args = append(args, "-fw_cfg", "name=opt/keygate/"+n+",file="+p)
	}
	return args, nil
}

// Wait waits for QEMU to exit (the guest powered off) or ctx to end; then
// it kills QEMU and swtpm and returns ctx's error with the console's tail.
func (v *VM) Wait(ctx context.Context) error {
	select {
	case <-v.qdone:
		if v.qerr != nil {
			return fmt.Errorf("qemu: %v: %s\n%s", v.qerr, strings.TrimSpace(v.qstderr.String()), v.Console.Tail(30))
		}
		return nil
	case <-ctx.Done():
		v.kill()
		return fmt.Errorf("guest did not power off: %w\n%s", ctx.Err(), v.Console.Tail(30))
	}
}

// Exited reports whether QEMU has exited.
func (v *VM) Exited() bool {
	select {
	case <-v.qdone:
		return true
	default:
		return false
	}
}

// Pids returns the process ids of QEMU and swtpm, for leak checks.
func (v *VM) Pids() []int {
	var p []int
	for _, c := range []*exec.Cmd{v.qemu, v.swtpm} {
		if c != nil && c.Process != nil {
			p = append(p, c.Process.Pid)
		}
	}
	return p
}

func (v *VM) kill() {
	if v.qemu != nil && v.qemu.Process != nil {
		v.qemu.Process.Kill()
		<-v.qdone
	}
	if v.swtpm != nil && v.swtpm.Process != nil {
		// SIGTERM first: swtpm then writes its state, which matters when
		// the state directory is kept for a later boot.
		v.swtpm.Process.Signal(syscall.SIGTERM)
		select {
		case <-v.sdone:
		case <-time.After(5 * time.Second):
			v.swtpm.Process.Kill()
			<-v.sdone
		}
	}
}

// Close kills QEMU and swtpm if they still run and removes the VM's
// temporary files. It is safe to call more than once.
func (v *VM) Close() error {
	v.kill()
	return os.RemoveAll(v.dir)
}

// waitSocket waits for swtpm to create its control socket. It only looks:
// with --terminate, a probe connection's close would end swtpm.
func waitSocket(path string, died <-chan struct{}) error {
	deadline := time.Now().Add(10 * time.Second)
	for {
		if fi, err := os.Stat(path); err == nil && fi.Mode()&os.ModeSocket != 0 {
			return nil
		}
		select {
		case <-died:
			return fmt.Errorf("exited before creating %s", path)
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("no socket %s after 10s", path)
		}
	}
}

func copyFile(src, dst string) error {
	b, err := os.ReadFile(src)
	if err != nil {
		return err
	}
	return os.WriteFile(dst, b, 0o600)
}
