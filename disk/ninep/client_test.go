package ninep_test

import (
	"bytes"
	"errors"
	"strings"
	"testing"

	"github.com/hugelgupf/p9/linux"
	"github.com/keygate/keygate/disk"
	"github.com/keygate/keygate/disk/ninep"
)

func TestClientHelpers(t *testing.T) {
	v := newVolume(t, disk.Ext4, 64<<20)
	root, hangup, err := ninep.Dial(v.sock)
	if err != nil {
		t.Fatal(err)
	}
	defer hangup()
	if _, err := root.Mkdir("dir", 0o755, 0, 0); err != nil {
		t.Fatal(err)
	}
	big := randBytes(3<<20 + 17) // several messages' worth
	tests := []struct {
		name    string
		path    string
		data    []byte
		wantErr error // from WriteFile
	}{
		{"top level", "/a.txt", []byte("hello"), nil},
		{"in a directory, no leading slash", "dir/b.bin", big, nil},
		{"empty file", "/dir/empty", nil, nil},
		{"exists already", "/a.txt", []byte("again"), linux.EEXIST},
		{"missing directory", "/nodir/c", []byte("x"), linux.ENOENT},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			err := ninep.WriteFile(root, tc.path, tc.data)
			if !errors.Is(err, tc.wantErr) || (tc.wantErr == nil) != (err == nil) {
				t.Fatalf("WriteFile(%s) = %v, want %v", tc.path, err, tc.wantErr)
			}
			if tc.wantErr != nil {
				return
			}
			got, err := ninep.ReadFile(root, tc.path)
			if err != nil || !bytes.Equal(got, tc.data) {
				t.Fatalf("ReadFile(%s) = %d bytes, %v; want %d bytes", tc.path, len(got), err, len(tc.data))
			}
		})
	}
	if err := ninep.WriteFile(root, "/", []byte("x")); err == nil || !strings.Contains(err.Error(), "no file name") {
		t.Errorf("WriteFile(/) = %v, want a refusal naming the missing file name", err)
	}
	if _, err := ninep.ReadFile(root, "/missing"); !errors.Is(err, linux.ENOENT) {
		t.Errorf("ReadFile(/missing) = %v, want ENOENT", err)
	}
	if _, _, err := ninep.Dial(v.sock + ".none"); err == nil {
		t.Error("Dial of a socket that does not exist succeeded")
	}
	// What WriteFile returned is durable: the next unlock sees it.
	fsys := v.reopen()
	var b bytes.Buffer
	if _, err := fsys.Get("/dir/b.bin", &b); err != nil || !bytes.Equal(b.Bytes(), big) {
		t.Fatalf("after reopening the image: %d bytes, %v", b.Len(), err)
	}
}
