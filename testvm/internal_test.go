package testvm

import (
	"bytes"
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/keygate/keygate/internal/testutil"
)

// TestCPIORoundTrip writes an archive and unpacks it with busybox's cpio, an
// independent reader of the newc format.
func TestCPIORoundTrip(t *testing.T) {
	if _, err := os.Stat(BusyboxPath); err != nil {
		testutil.Skip(t, "qemu", "busybox-static is not installed (make test installs it)")
	}
	var buf bytes.Buffer
	c := newCPIOWriter(&buf)
	for _, err := range []error{
		c.Dir("etc", 0o755),
		c.File("etc/odd", 0o644, []byte("three")), // forces padding
		c.File("etc/empty", 0o600, nil),
		c.Symlink("etc/link", "odd"),
		c.Dir("bin", 0o755),
		c.File("bin/tool", 0o755, bytes.Repeat([]byte{0xa5}, 4097)),
	} {
		if err != nil {
			t.Fatal(err)
		}
	}
	if err := c.File("etc/odd", 0o644, nil); err == nil {
		t.Errorf("a duplicate entry was accepted")
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if buf.Len()%4 != 0 {
		t.Errorf("archive length %d is not a multiple of 4", buf.Len())
	}
	dir := t.TempDir()
	cmd := exec.Command(BusyboxPath, "cpio", "-i", "-d")
	cmd.Dir, cmd.Stdin = dir, &buf
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("busybox cpio -i: %v\n%s", err, out)
	}
	for _, f := range []struct {
		path string
		data string
		mode os.FileMode
	}{
		{"etc/odd", "three", 0o644},
		{"etc/empty", "", 0o600},
		{"bin/tool", strings.Repeat("\xa5", 4097), 0o755},
	} {
		p := filepath.Join(dir, f.path)
		b, err := os.ReadFile(p)
		if err != nil || string(b) != f.data {
			t.Errorf("%s: %d bytes, %v; want %d bytes", f.path, len(b), err, len(f.data))
			continue
		}
		if fi, _ := os.Stat(p); fi.Mode().Perm() != f.mode {
			t.Errorf("%s: mode %v, want %v", f.path, fi.Mode().Perm(), f.mode)
		}
	}
	if l, err := os.Readlink(filepath.Join(dir, "etc/link")); err != nil || l != "odd" {
		t.Errorf("etc/link -> %q, %v; want odd", l, err)
	}
}

// TestInitramfsDeterministic checks that equal inputs give equal archives:
// the initrd's PCR 9 measurement must not vary between builds.
func TestInitramfsDeterministic(t *testing.T) {
	k := cachedKernel(t)
	dir := t.TempDir()
	files := map[string][]byte{"etc/b": []byte("2"), "etc/a": []byte("1"), "bin/x": []byte("#!/bin/sh\n")}
	var out [][]byte
	for i := range 2 {
		p := filepath.Join(dir, "i"+string(rune('0'+i)))
		if err := (&Initramfs{Kernel: k, Files: files}).Write(p); err != nil {
			t.Fatal(err)
		}
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, b)
	}
	if !bytes.Equal(out[0], out[1]) {
		t.Errorf("two builds of the same initramfs differ")
	}
	// A dynamically linked program would not run in the guest: refuse it.
	ls, err := exec.LookPath("ls")
	if err != nil {
		t.Skip("no ls to try a dynamic binary with")
	}
	err = (&Initramfs{Kernel: k, Keygate: ls}).Write(filepath.Join(dir, "dyn"))
	if err == nil || !strings.Contains(err.Error(), "CGO_ENABLED=0") {
		t.Errorf("a dynamic keygate binary: err = %v, want a refusal naming CGO_ENABLED=0", err)
	}
	if _, err := os.Stat(filepath.Join(dir, "dyn")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("a failed build left its archive behind")
	}
}

// TestModuleClosure resolves dependencies from the real modules' .modinfo.
func TestModuleClosure(t *testing.T) {
	k := cachedKernel(t)
	index := map[string]string{}
	for _, m := range k.Modules {
		index[m.Name] = m.Path
	}
	tests := []struct {
		name    string
		index   map[string]string
		want    []string
		before  [2]string // before[0] must come before before[1]
		wantErr string
	}{
		{name: "dm-crypt", index: index, want: []string{"dm-crypt"}, before: [2]string{"dm_mod", "dm_crypt"}},
		{name: "9p", index: index, want: []string{"9p"}, before: [2]string{"9pnet", "9p"}},
		{name: "unknown", index: index, want: []string{"no_such_module"}, wantErr: "no module"},
		{name: "missing dependency", index: without(index, "dm_mod"), want: []string{"dm_crypt"}, wantErr: "depends on dm_mod"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			order, err := moduleClosure(tc.index, tc.want)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("err = %v, want one containing %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			i, j := slices.Index(order, tc.before[0]), slices.Index(order, tc.before[1])
			if i < 0 || j < 0 || i > j {
				t.Errorf("order %v: want %s before %s", order, tc.before[0], tc.before[1])
			}
		})
	}
}

func without(m map[string]string, k string) map[string]string {
	c := map[string]string{}
	for a, b := range m {
		if a != k {
			c[a] = b
		}
	}
	return c
}

func cachedKernel(t *testing.T) *Kernel {
	t.Helper()
	if testing.Short() {
		t.Skip("skipping the kernel fetch in -short mode")
	}
	cache, err := CacheDir()
	if err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(cache, 0o755); err != nil {
		t.Fatal(err)
	}
	k, err := FetchKernel(context.Background(), cache, DefaultModules)
	if errors.Is(err, ErrNoKernelPackage) {
		testutil.Skip(t, "qemu", err.Error())
	}
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// TestInitramfsParentDirs checks that extra files in directories the base
// layout lacks get those directories: the kernel's unpacker, like cpio
// without -d, drops a file whose directory is not in the archive.
func TestInitramfsParentDirs(t *testing.T) {
	if _, err := os.Stat(BusyboxPath); err != nil {
		testutil.Skip(t, "qemu", "busybox-static is not installed (make test installs it)")
	}
	k := cachedKernel(t)
	dir := t.TempDir()
	files := map[string][]byte{"lib/cs/libx.so.1": []byte("x"), "a/b/c": []byte("deep"), "etc/top": []byte("t")}
	p := filepath.Join(dir, "initrd")
	if err := (&Initramfs{Kernel: k, Files: files}).Write(p); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	root := filepath.Join(dir, "root")
	if err := os.Mkdir(root, 0o755); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(BusyboxPath, "cpio", "-i") // no -d: as the kernel
	cmd.Dir, cmd.Stdin = root, f
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("busybox cpio -i: %v\n%s", err, out)
	}
	for name, want := range files {
		if b, err := os.ReadFile(filepath.Join(root, name)); err != nil || !bytes.Equal(b, want) {
			t.Errorf("%s: %q, %v; want %q", name, b, err, want)
		}
	}
}
