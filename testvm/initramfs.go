package testvm

import (
	"bytes"
	"context"
	"debug/elf"
	_ "embed"
	"fmt"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"sort"
	"strings"
)

//go:embed init.sh
var initScript []byte

// InitScript returns the guest's default /init.
func InitScript() []byte { return bytes.Clone(initScript) }

// BusyboxPath is where Debian's busybox-static installs its binary.
const BusyboxPath = "/bin/busybox"

// Initramfs describes the guest's initramfs. Its bytes are a pure function
// of the inputs, so an unchanged Initramfs measures the same.
type Initramfs struct {
	Kernel  *Kernel
	Busybox string // a static busybox; BusyboxPath when empty
	Keygate string // a static keygate binary, at /bin/keygate; none when empty
	// Init is /init; InitScript() when nil.
	Init []byte
	// Files are extra files by guest path (mode 0644, or 0755 under bin/).
	Files map[string][]byte
}

// Write builds the archive at path.
func (r *Initramfs) Write(path string) error {
	if r.Kernel == nil {
		return fmt.Errorf("initramfs: no kernel (its modules go in the archive)")
	}
	bb := r.Busybox
	if bb == "" {
		bb = BusyboxPath
	}
	busybox, err := os.ReadFile(bb)
	if err != nil {
		return fmt.Errorf("initramfs: read busybox: %w (install busybox-static)", err)
	}
	if !isStatic(busybox) {
		return fmt.Errorf("initramfs: %s is dynamically linked; the guest has no libc (install busybox-static)", bb)
	}
	init := r.Init
	if init == nil {
		init = initScript
	}
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	c := newCPIOWriter(f)
	err = r.write(c, busybox, init)
	if cerr := c.Close(); err == nil {
		err = cerr
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(path)
		return fmt.Errorf("initramfs %s: %w", path, err)
	}
	return nil
}

// baseDirs are the directories every initramfs has.
var baseDirs = []string{"bin", "dev", "etc", "lib", "lib/modules", "mnt", "proc", "root", "run", "sbin", "sys", "tmp", "usr", "usr/bin", "usr/sbin"}

func (r *Initramfs) write(c *cpioWriter, busybox, init []byte) error {
	for _, d := range baseDirs {
		if err := c.Dir(d, 0o755); err != nil {
			return err
		}
	}
	// The kernel opens /dev/console for PID 1 before /init can mount
	// devtmpfs; without the node /init would start with no stdout.
	if err := c.CharDev("dev/console", 0o600, 5, 1); err != nil {
		return err
	}
	if err := c.File("init", 0o755, init); err != nil {
		return err
	}
	if err := c.File("bin/busybox", 0o755, busybox); err != nil {
		return err
	}
	if err := c.Symlink("bin/sh", "busybox"); err != nil {
		return err
	}
	if r.Keygate != "" {
		kg, err := os.ReadFile(r.Keygate)
		if err != nil {
			return fmt.Errorf("read keygate: %w", err)
		}
		if !isStatic(kg) {
			return fmt.Errorf("%s is dynamically linked; build it with CGO_ENABLED=0", r.Keygate)
		}
		if err := c.File("bin/keygate", 0o755, kg); err != nil {
			return err
		}
	}
	var order []string
	for _, m := range r.Kernel.Modules {
		b, err := os.ReadFile(m.Path)
		if err != nil {
			return fmt.Errorf("read module %s: %w", m.Name, err)
		}
		if err := c.File("lib/modules/"+m.Name+".ko", 0o644, b); err != nil {
			return err
		}
		order = append(order, m.Name)
	}
	if err := c.File("etc/modules", 0o644, []byte(strings.Join(order, "\n")+"\n")); err != nil {
		return err
	}
	names := make([]string, 0, len(r.Files))
	for n := range r.Files {
		names = append(names, n)
	}
	sort.Strings(names) // map order would make the archive, and PCR 9, vary
	// The kernel's unpacker makes no parent directories: a file whose
	// directory the archive lacks is silently dropped.
	dirs := map[string]bool{}
	for _, d := range baseDirs {
		dirs[d] = true
	}
	for _, n := range names {
		var parents []string
		for d := path.Dir(strings.TrimPrefix(n, "/")); d != "." && d != "/" && !dirs[d]; d = path.Dir(d) {
			parents = append(parents, d)
		}
		for i := len(parents) - 1; i >= 0; i-- {
			if err := c.Dir(parents[i], 0o755); err != nil {
				return err
			}
			dirs[parents[i]] = true
		}
	}
	for _, n := range names {
		perm := uint32(0o644)
		if strings.HasPrefix(strings.TrimPrefix(n, "/"), "bin/") {
			perm = 0o755
		}
		if err := c.File(n, perm, r.Files[n]); err != nil {
			return err
		}
	}
	return nil
}

// isStatic reports whether b is an ELF executable with no program
// interpreter (no PT_INTERP), i.e. one that runs without a libc.
func isStatic(b []byte) bool {
	f, err := elf.NewFile(bytes.NewReader(b))
	if err != nil {
		return false
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			return false
		}
	}
	return true
}

// BuildKeygate builds a static keygate (CGO_ENABLED=0: the guest has no
// libc, and the cgo-only TPM simulator is left out) into dir and returns
// its path. Without a VCS stamp the bytes stay the same between runs of the
// same tree, and so does the initrd's measurement; -trimpath is left out so
// that the build shares Go's build cache with go test and make build.
// $KEYGATE_TESTVM_KEYGATE, when set, names a prebuilt static binary to use
// instead.
func BuildKeygate(ctx context.Context, dir string) (string, error) {
	if p := os.Getenv("KEYGATE_TESTVM_KEYGATE"); p != "" {
		return p, nil
	}
	root, err := ModuleRoot()
	if err != nil {
		return "", err
	}
	out := filepath.Join(dir, "keygate")
	cmd := exec.CommandContext(ctx, "go", "build", "-buildvcs=false", "-ldflags=-s -w", "-o", out, "./cmd/keygate")
	cmd.Dir = root
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH=amd64")
	if b, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("build a static keygate (CGO_ENABLED=0 go build ./cmd/keygate): %v\n%s", err, b)
	}
	return out, nil
}

// ModuleRoot returns the root of the keygate module (the directory holding
// go.mod) at or above the working directory.
func ModuleRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for d := dir; ; d = filepath.Dir(d) {
		if _, err := os.Stat(filepath.Join(d, "go.mod")); err == nil {
			return d, nil
		}
		if filepath.Dir(d) == d {
			return "", fmt.Errorf("find the module root above %s: no go.mod (run from the keygate tree)", dir)
		}
	}
}
