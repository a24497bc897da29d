package main

import (
	"bytes"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestBadImages feeds the CLI damaged and foreign images. Each must fail with
// exit 1 and a message naming the problem: never a panic (exit 2), never a
// silent success, and never a change to the file.
func TestBadImages(t *testing.T) {
	dir := t.TempDir()
	key := filepath.Join(dir, "key")
	if err := os.WriteFile(key, []byte("robustness key"), 0o600); err != nil {
		t.Fatal(err)
	}
	good := filepath.Join(dir, "good.img")
	keygate(t, "disk", "create", good, "--size", "32M", "--fs", "ext4", "--key-file", key, "--pbkdf", "pbkdf2")
	goodBytes, err := os.ReadFile(good)
	if err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewPCG(1, 2))
	random := make([]byte, 1<<20)
	for i := range random {
		random[i] = byte(rng.Uint32())
	}
	bothHeaders := bytes.Clone(goodBytes)
	copy(bothHeaders[0:8], "garbage!")
	copy(bothHeaders[16384:16392], "garbage!")
	noFS := bytes.Clone(goodBytes)
	clear(noFS[16<<20 : 17<<20]) // the filesystem's first MiB, as ciphertext

	for _, tc := range []struct {
		name      string
		content   []byte
		want      string
		headerBad bool // add-key, which needs no data, must fail too
	}{
		{"empty", nil, "too short", true},
		{"random", random, "primary header: magic", true},
		{"truncated in keyslots", goodBytes[:1<<20], "truncated", true},
		{"header only", goodBytes[:16<<20], "no data", false},
		{"both headers smashed", bothHeaders, "secondary header: magic", true},
		{"no filesystem", noFS, "no FAT32 or ext4 filesystem", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			img := filepath.Join(dir, strings.ReplaceAll(tc.name, " ", "_")+".img")
			if err := os.WriteFile(img, tc.content, 0o600); err != nil {
				t.Fatal(err)
			}
			cmds := [][]string{
				{"disk", "ls", img, "--key-file", key},
				{"disk", "put", img, key, "/k", "--key-file", key},
			}
			if tc.headerBad {
				cmds = append(cmds, []string{"disk", "add-key", img, "--key-file", key, "--new-key-file", key, "--pbkdf", "pbkdf2"})
			}
			for _, args := range cmds {
				var out, errb bytes.Buffer
				code := run(args, strings.NewReader(""), &out, &errb)
				if code != 1 {
					t.Errorf("%v: exit %d, want 1; stderr: %s", args[:2], code, errb.String())
				}
				if !strings.Contains(errb.String(), tc.want) {
					t.Errorf("%v: stderr %q does not mention %q", args[:2], errb.String(), tc.want)
				}
				if after, _ := os.ReadFile(img); !bytes.Equal(after, tc.content) {
					t.Errorf("%v: the failed command changed the image", args[:2])
				}
			}
		})
	}
}

// TestNoPanics runs malformed command lines; none may panic (exit 2).
func TestNoPanics(t *testing.T) {
	for _, args := range [][]string{
		{}, {""}, {"disk"}, {"disk", ""}, {"disk", "create"}, {"disk", "create", ""},
		{"disk", "create", "x", "--size", "-5M", "--key-file", "k"},
		{"disk", "create", "x", "--size", "99999999999999T", "--key-file", "k"},
		{"disk", "create", "x", "--size", "M", "--key-file", "k"},
		{"disk", "create", "x", "--sector-size", "0", "--size", "64M", "--key-file", "k"},
		{"disk", "remove-key", "x", "--key-file", "k", "--slot", "-7"},
		{"disk", "remove-key", "x", "--key-file", "k", "--slot", "abc"},
		{"disk", "ls", "/dev/null", "--key-file", "/dev/null"},
		{"disk", "info", "/dev/null"}, {"disk", "info", "/"}, {"disk", "get", "/", "/", "/"},
		{"disk", "put", "x", "y"}, {"disk", "mkfs", "x", "--fs", ""}, {"--json"}, {"version", "extra"},
	} {
		var out, errb bytes.Buffer
		if code := run(args, strings.NewReader(""), &out, &errb); code == 2 {
			t.Errorf("keygate %q panicked: %s", args, errb.String())
		}
	}
}
