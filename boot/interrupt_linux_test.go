package boot

import (
	"bytes"
	"errors"
	"fmt"
	"github.com/keygate/keygate/disk/ninep"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
	"testing"

	"github.com/keygate/keygate/disk"
	"github.com/keygate/keygate/internal/testutil"
	"github.com/keygate/keygate/tpm"
)

// TestInterruptedWrites: clients write through 9P while the serving
// process is interrupted, by a revoke (wipe and close) or by kill -9. Every
// write whose fsync and clunk returned must be in the volume afterwards,
// whole; the others may be missing or short, but the filesystem must be
// consistent (e2fsck finds nothing to fix) when it is next unlocked.
func TestInterruptedWrites(t *testing.T) {
	e2fsck := testutil.LookPath(t, "e2fsck")
	e := startEnv(t)
	for _, tc := range []struct {
		name      string
		interrupt func(t *testing.T, ch *childProc, vm string)
	}{
		{"revoke", func(t *testing.T, ch *childProc, vm string) {
			e.admin(t, "POST", "/v1/admin/vms/"+vm+"/revoke", nil, http.StatusOK)
			ch.expect("locked")
		}},
		{"kill-9", func(t *testing.T, ch *childProc, vm string) {
			ch.cmd.Process.Signal(syscall.SIGKILL)
			ch.cmd.Wait()
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			sock, _ := testutil.StartSwtpm(t, "")
			tp, err := tpm.Open("swtpm:" + sock)
			if err != nil {
				t.Fatal(err)
			}
			vm := "int-" + tc.name
			e.enroll(t, tp, vm, false)
			tp.Close()
			img, uk := knownVolume(t, e, vm)
			defer uk.Destroy()
			ch := spawn(t, e, img, vm, sock)
			ch.expect("serving")

			// Two clients write files of 256 KiB until the server goes away.
			var mu sync.Mutex
			acked := map[string][]byte{}
			var wg sync.WaitGroup
			started := make(chan struct{}, 2)
			for c := range 2 {
				root, done := p9Client(t, ch.sock)
				wg.Add(1)
				go func() {
					defer wg.Done()
					defer done()
					for i := 0; ; i++ {
						name := fmt.Sprintf("c%d-%03d", c, i)
						data := bytes.Repeat([]byte(name+" "), 256<<10/8)
						if err := ninep.WriteFile(root, name, data); err != nil {
							return // the server went away: a clean failure
						}
						mu.Lock()
						acked[name] = data
						mu.Unlock()
						if i == 1 {
							started <- struct{}{}
						}
					}
				}()
			}
			<-started
			<-started
			tc.interrupt(t, ch, vm)
			wg.Wait()
			if len(acked) == 0 {
				t.Fatal("no write completed before the interruption")
			}

			// The next unlock: open with the UK, check every acknowledged file,
			// then e2fsck the decrypted filesystem.
			key, err := disk.NewKey(uk.Bytes())
			if err != nil {
				t.Fatal(err)
			}
			im, err := disk.OpenImage(img, key, false)
			key.Destroy()
			if err != nil {
				t.Fatalf("reopen: %v", err)
			}
			defer im.Close()
			fs, err := im.FS()
			if err != nil {
				t.Fatalf("filesystem after %s: %v", tc.name, err)
			}
			for name, want := range acked {
				var got bytes.Buffer
				if _, err := fs.Get("/"+name, &got); err != nil || !bytes.Equal(got.Bytes(), want) {
					t.Errorf("acknowledged %s: %d bytes, %v; want %d bytes", name, got.Len(), err, len(want))
				}
			}
			plain := filepath.Join(t.TempDir(), "plain.ext4")
			f, err := os.Create(plain)
			if err != nil {
				t.Fatal(err)
			}
			dev := im.Device()
			_, err = io.Copy(f, io.NewSectionReader(dev, 0, dev.Size()))
			if err := errors.Join(err, f.Close()); err != nil {
				t.Fatal(err)
			}
			out, err := exec.Command(e2fsck, "-fn", plain).CombinedOutput()
			if err != nil {
				t.Fatalf("e2fsck after %s (%d files acknowledged): %v\n%s", tc.name, len(acked), err, out)
			}
			t.Logf("%d acknowledged files intact; e2fsck clean", len(acked))
		})
	}
}
