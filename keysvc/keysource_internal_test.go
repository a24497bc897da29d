package keysvc

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"

	"github.com/keygate/keygate/keysvc/masterkey"
)

// TestInstallCrashKeepsKey stops install at each point a crash can leave
// behind and loads the key source again: the key on master.key afterwards
// is whole (the old one before the rename, the new one after it), and
// master.key.old is gone. A crash between install's link and its rename
// once made load wipe the key in use through that second link.
func TestInstallCrashKeepsKey(t *testing.T) {
	for _, tc := range []struct {
		name    string
		crash   func(t *testing.T, f fileSource)
		wantNew bool
	}{
		{"after the link, before the rename", func(t *testing.T, f fileSource) {
			if err := os.Link(f.path, f.path+oldKeySuffix); err != nil {
				t.Fatal(err)
			}
		}, false},
		{"after the rename, before the wipe", func(t *testing.T, f fileSource) {
			if err := os.Link(f.path, f.path+oldKeySuffix); err != nil {
				t.Fatal(err)
			}
			if err := os.Rename(f.path+NextKeySuffix, f.path); err != nil {
				t.Fatal(err)
			}
		}, true},
		{"install completed", func(t *testing.T, f fileSource) {
			if err := f.install(); err != nil {
				t.Fatal(err)
			}
		}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := fileSource{path: filepath.Join(t.TempDir(), "master.key")}
			if _, _, err := masterkey.LoadOrCreate(f.path); err != nil {
				t.Fatal(err)
			}
			if _, err := f.next(true); err != nil {
				t.Fatal(err)
			}
			oldKey, _ := os.ReadFile(f.path)
			newKey, _ := os.ReadFile(f.path + NextKeySuffix)
			tc.crash(t, f)
			mk, _, err := f.load()
			if err != nil {
				t.Fatalf("load after the crash: %v", err)
			}
			mk.Destroy()
			got, _ := os.ReadFile(f.path)
			want := oldKey
			if tc.wantNew {
				want = newKey
			}
			if !bytes.Equal(got, want) {
				t.Fatalf("master.key holds neither the expected key (new=%v) after the crash", tc.wantNew)
			}
			if _, err := os.Stat(f.path + oldKeySuffix); !os.IsNotExist(err) {
				t.Fatalf("master.key.old still there: %v", err)
			}
		})
	}
}
