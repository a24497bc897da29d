package testvm

import (
	"archive/tar"
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"debug/elf"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
)

// KernelMetaPackage is the Debian package whose dependency names the kernel
// the guest boots.
const KernelMetaPackage = "linux-image-amd64"

// DefaultModules are the kernel modules the guest loads, by module name
// (dependencies are added by Kernel). They cover the virtio disk and network
// the guest boots with, fw_cfg (the per-run, unmeasured parameters), the 9P
// client over virtio (host shares) and over a unix socket (keygate's export:
// 9pnet_fd, which the kernel would otherwise ask modprobe for as "9p-unix"),
// dm-crypt for the cross-check with the kernel's own LUKS2, ext4, and nbd,
// the kernel's client of keygate's block-level export (--attach /dev/nbdN).
// crc32c_generic and the xts/aesni modules are named because the kernel asks
// for them by alias at run time (ext4's crc32c, dm-crypt's cipher), and the
// guest has no modprobe index to resolve aliases.
var DefaultModules = []string{
	"virtio_pci", "virtio_blk", "virtio_net", "qemu_fw_cfg",
	"9p", "9pnet_virtio", "9pnet_fd",
	"dm_crypt", "xts", "aesni_intel",
	"ext4", "crc32c_generic",
	"loop",
	"nbd",
}

// Kernel is an extracted Debian kernel and the modules one guest needs.
type Kernel struct {
	Package string // e.g. linux-image-6.1.0-56-amd64
	Version string // Debian package version, e.g. 6.1.192-2
	Release string // uname -r, e.g. 6.1.0-56-amd64
	Image   string // path of the bzImage (an EFI-stub PE binary)
	// Modules are the .ko files to load, in dependency order.
	Modules []Module
}

// Module is one kernel module file.
type Module struct {
	Name string // module name, with underscores (dm_crypt)
	Path string // path of the .ko in the cache
}

// kernelManifest is what the cache keeps next to the extracted files.
type kernelManifest struct {
	Package string   `json:"package"`
	Version string   `json:"version"`
	Release string   `json:"release"`
	Modules []string `json:"modules"` // load order, module names
}

// CacheDir returns the directory testvm caches its artefacts in:
// $KEYGATE_TESTVM_CACHE when set, else .cache/testvm at the root of the
// module that contains the working directory.
func CacheDir() (string, error) {
	if d := os.Getenv("KEYGATE_TESTVM_CACHE"); d != "" {
		return filepath.Abs(d)
	}
	root, err := ModuleRoot()
	if err != nil {
		return "", fmt.Errorf("%w (or set KEYGATE_TESTVM_CACHE)", err)
	}
	return filepath.Join(root, ".cache", "testvm"), nil
}

// ErrNoKernelPackage means apt knows no kernel package to fetch.
var ErrNoKernelPackage = errors.New("no Debian kernel package available")

// CandidateKernel asks apt which kernel package linux-image-amd64 depends
// on and which version apt would fetch. It reads only apt's local lists.
func CandidateKernel(ctx context.Context) (pkg, version string, err error) {
	out, err := exec.CommandContext(ctx, "apt-cache", "show", "--no-all-versions", KernelMetaPackage).Output()
	if err != nil {
		return "", "", fmt.Errorf("%w: apt-cache show %s: %v (run on Debian, after apt-get update)", ErrNoKernelPackage, KernelMetaPackage, err)
	}
	for _, line := range strings.Split(string(out), "\n") {
		deps, ok := strings.CutPrefix(line, "Depends: ")
		if !ok {
			continue
		}
		for _, d := range strings.Split(deps, ",") {
			// "linux-image-6.1.0-56-amd64 (= 6.1.192-2)"
			f := strings.Fields(strings.NewReplacer("(", " ", ")", " ").Replace(d))
			if len(f) == 3 && strings.HasPrefix(f[0], "linux-image-") && f[1] == "=" {
				return f[0], f[2], nil
			}
		}
	}
	return "", "", fmt.Errorf("%w: %s has no versioned linux-image-* dependency (run apt-get update)", ErrNoKernelPackage, KernelMetaPackage)
}

// aptStamp identifies the state of apt's lists and pins: apt's candidate
// can change only when it does.
func aptStamp() string {
	var b strings.Builder
	for _, pat := range []string{"/var/lib/apt/lists/*", "/etc/apt/preferences", "/etc/apt/preferences.d/*"} {
		m, _ := filepath.Glob(pat)
		for _, f := range m {
			if fi, err := os.Stat(f); err == nil && fi.Mode().IsRegular() {
				fmt.Fprintf(&b, "%s %d %d\n", f, fi.Size(), fi.ModTime().UnixNano())
			}
		}
	}
	sum := sha256.Sum256([]byte(b.String()))
	return hex.EncodeToString(sum[:])
}

// candidateCached is CandidateKernel, remembered in cacheDir until apt's
// lists change: apt-cache decompresses and parses every list on each call,
// which takes seconds where apt keeps no binary cache.
func candidateCached(ctx context.Context, cacheDir string) (pkg, version string, err error) {
	type memo struct{ Stamp, Package, Version string }
	p := filepath.Join(cacheDir, "kernel", "candidate.json")
	stamp := aptStamp()
	var m memo
	if b, err := os.ReadFile(p); err == nil && json.Unmarshal(b, &m) == nil && m.Stamp == stamp && m.Package != "" {
		return m.Package, m.Version, nil
	}
	pkg, version, err = CandidateKernel(ctx)
	if err != nil {
		return "", "", err
	}
	if b, err := json.Marshal(memo{stamp, pkg, version}); err == nil && os.MkdirAll(filepath.Dir(p), 0o755) == nil {
		os.WriteFile(p, b, 0o644) // a lost memo only costs the next run a lookup
	}
	return pkg, version, nil
}

// FetchKernel returns the candidate Debian kernel with the closure of the
// named modules, from the cache under cacheDir or, when the cache has no
// entry for this package version and module set, by fetching the package
// with apt-get download and extracting it (never installing it).
func FetchKernel(ctx context.Context, cacheDir string, modules []string) (*Kernel, error) {
	pkg, ver, err := candidateCached(ctx, cacheDir)
	if err != nil {
		return nil, err
	}
	key := sha256.Sum256([]byte(strings.Join(sortedNames(modules), ",")))
	dir := filepath.Join(cacheDir, "kernel", pkg+"_"+ver+"_"+hex.EncodeToString(key[:4]))
	if k, err := loadKernel(dir); err == nil {
		return k, nil
	}
	if err := os.MkdirAll(filepath.Dir(dir), 0o755); err != nil {
		return nil, err
	}
	tmp, err := os.MkdirTemp(filepath.Dir(dir), ".fetch-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(tmp)
	deb, err := downloadDeb(ctx, cacheDir, pkg, ver)
	if err != nil {
		return nil, err
	}
	if err := extractKernel(ctx, deb, tmp, pkg, ver, modules); err != nil {
		return nil, err
	}
	// A rename publishes the entry whole: a crash mid-fetch leaves only a
	// .fetch- directory, never a half-filled entry that loadKernel trusts.
	os.RemoveAll(dir)
	if err := os.Rename(filepath.Join(tmp, "out"), dir); err != nil {
		return nil, err
	}
	return loadKernel(dir)
}

func sortedNames(modules []string) []string {
	s := make([]string, len(modules))
	for i, m := range modules {
		s[i] = modName(m)
	}
	sort.Strings(s)
	return s
}

// modName is the kernel's name for a module: file names use - and _
// interchangeably.
func modName(s string) string {
	return strings.ReplaceAll(strings.TrimSuffix(filepath.Base(s), ".ko"), "-", "_")
}

func loadKernel(dir string) (*Kernel, error) {
	b, err := os.ReadFile(filepath.Join(dir, "manifest.json"))
	if err != nil {
		return nil, err
	}
	var m kernelManifest
	if err := json.Unmarshal(b, &m); err != nil {
		return nil, fmt.Errorf("kernel cache %s: %v (delete it to refetch)", dir, err)
	}
	k := &Kernel{Package: m.Package, Version: m.Version, Release: m.Release, Image: filepath.Join(dir, "vmlinuz")}
	if _, err := os.Stat(k.Image); err != nil {
		return nil, err
	}
	for _, name := range m.Modules {
		p := filepath.Join(dir, "modules", name+".ko")
		if _, err := os.Stat(p); err != nil {
			return nil, err
		}
		k.Modules = append(k.Modules, Module{Name: name, Path: p})
	}
	return k, nil
}

// downloadDeb returns the cached .deb of pkg at ver, fetching it with
// apt-get download when missing.
func downloadDeb(ctx context.Context, cacheDir, pkg, ver string) (string, error) {
	debDir := filepath.Join(cacheDir, "deb")
	// apt writes an epoch's colon as %3a in the file name.
	name := fmt.Sprintf("%s_%s_amd64.deb", pkg, strings.ReplaceAll(ver, ":", "%3a"))
	p := filepath.Join(debDir, name)
	if _, err := os.Stat(p); err == nil {
		return p, nil
	}
	tmp, err := os.MkdirTemp(cacheDir, ".deb-")
	if err != nil {
		return "", err
	}
	defer os.RemoveAll(tmp)
	cmd := exec.CommandContext(ctx, "apt-get", "download", pkg+"="+ver)
	cmd.Dir = tmp
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("%w: apt-get download %s=%s: %v: %s (check network access to the Debian mirror)", ErrNoKernelPackage, pkg, ver, err, strings.TrimSpace(stderr.String()))
	}
	if err := os.MkdirAll(debDir, 0o755); err != nil {
		return "", err
	}
	if err := os.Rename(filepath.Join(tmp, name), p); err != nil {
		return "", fmt.Errorf("apt-get download %s=%s wrote no %s: %v", pkg, ver, name, err)
	}
	return p, nil
}

// extractKernel unpacks the bzImage and every module from deb into tmp,
// then copies the image and the closure of modules into tmp/out.
func extractKernel(ctx context.Context, deb, tmp, pkg, ver string, modules []string) error {
	cmd := exec.CommandContext(ctx, "dpkg-deb", "--fsys-tarfile", deb)
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return err
	}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("dpkg-deb: %v (install dpkg)", err)
	}
	all := filepath.Join(tmp, "all")
	image, release, index, terr := untarKernel(bufio.NewReaderSize(stdout, 1<<20), all)
	if terr != nil {
		cmd.Process.Kill()
	}
	if err := cmd.Wait(); err != nil && terr == nil {
		return fmt.Errorf("dpkg-deb --fsys-tarfile %s: %v: %s", deb, err, strings.TrimSpace(stderr.String()))
	}
	if terr != nil {
		return fmt.Errorf("extract %s: %w", deb, terr)
	}
	if image == "" {
		return fmt.Errorf("extract %s: no boot/vmlinuz-* in the package", deb)
	}
	order, err := moduleClosure(index, modules)
	if err != nil {
		return fmt.Errorf("kernel %s %s: %w", pkg, ver, err)
	}
	out := filepath.Join(tmp, "out")
	if err := os.MkdirAll(filepath.Join(out, "modules"), 0o755); err != nil {
		return err
	}
	if err := os.Rename(image, filepath.Join(out, "vmlinuz")); err != nil {
		return err
	}
	for _, name := range order {
		if err := os.Rename(index[name], filepath.Join(out, "modules", name+".ko")); err != nil {
			return err
		}
	}
	b, err := json.MarshalIndent(kernelManifest{Package: pkg, Version: ver, Release: release, Modules: order}, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(out, "manifest.json"), b, 0o644)
}

// untarKernel writes the package's bzImage and .ko files under dir and
// returns the image's path, the kernel release and an index from module
// name to file.
func untarKernel(r io.Reader, dir string) (image, release string, index map[string]string, err error) {
	index = map[string]string{}
	tr := tar.NewReader(r)
	n := 0
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return image, release, index, nil
		}
		if err != nil {
			return "", "", nil, err
		}
		if h.Typeflag != tar.TypeReg {
			continue
		}
		name := strings.TrimPrefix(h.Name, "./")
		var dst string
		switch {
		case strings.HasPrefix(name, "boot/vmlinuz-"):
			release = strings.TrimPrefix(name, "boot/vmlinuz-")
			dst = filepath.Join(dir, "vmlinuz")
			image = dst
		case strings.HasPrefix(name, "lib/modules/") && strings.HasSuffix(name, ".ko"):
			n++
			dst = filepath.Join(dir, "ko", fmt.Sprint(n)+".ko")
			index[modName(name)] = dst
		default:
			continue
		}
		if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
			return "", "", nil, err
		}
		f, err := os.Create(dst)
		if err != nil {
			return "", "", nil, err
		}
		_, err = io.Copy(f, tr)
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return "", "", nil, err
		}
	}
}

// moduleClosure returns the named modules and everything they depend on
// (the "depends=" of each module's .modinfo), dependencies first.
func moduleClosure(index map[string]string, want []string) ([]string, error) {
	var order []string
	state := map[string]int{} // 1 visiting, 2 done
	var visit func(name, from string) error
	visit = func(name, from string) error {
		switch state[name] {
		case 1:
			return fmt.Errorf("module dependency cycle at %s", name)
		case 2:
			return nil
		}
		path, ok := index[name]
		if !ok {
			if from == "" {
				return fmt.Errorf("no module %q in the kernel package (it may be built in: check boot/config-*; or fix the name)", name)
			}
			return fmt.Errorf("module %s depends on %s, which the package lacks", from, name)
		}
		state[name] = 1
		deps, err := moduleDepends(path)
		if err != nil {
			return fmt.Errorf("module %s: %w", name, err)
		}
		for _, d := range deps {
			if err := visit(d, name); err != nil {
				return err
			}
		}
		state[name] = 2
		order = append(order, name)
		return nil
	}
	for _, w := range want {
		if err := visit(modName(w), ""); err != nil {
			return nil, err
		}
	}
	return order, nil
}

// moduleDepends reads the "depends=" entry of a module's .modinfo section.
func moduleDepends(path string) ([]string, error) {
	f, err := elf.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	s := f.Section(".modinfo")
	if s == nil {
		return nil, fmt.Errorf("%s has no .modinfo section", path)
	}
	data, err := s.Data()
	if err != nil {
		return nil, err
	}
	for _, kv := range bytes.Split(data, []byte{0}) {
		if v, ok := bytes.CutPrefix(kv, []byte("depends=")); ok {
			var deps []string
			for _, d := range strings.Split(string(v), ",") {
				if d != "" {
					deps = append(deps, modName(d))
				}
			}
			return deps, nil
		}
	}
	return nil, nil
}
