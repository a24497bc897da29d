package keymem_test

import (
	"bytes"
	"errors"
	"os"
	"os/exec"
	"slices"
	"testing"

	"github.com/awnumar/memguard"

	"github.com/keygate/keygate/internal/testutil"
	"github.com/keygate/keygate/keymem"
)

func TestRegistry(t *testing.T) {
	page := uint64(os.Getpagesize())
	tests := []struct {
		name       string
		start, end uint64
		want       keymem.Range
	}{
		{"aligned", 4 * page, 5 * page, keymem.Range{Start: 4 * page, End: 5 * page}},
		{"widened to pages", 4*page + 10, 4*page + 20, keymem.Range{Start: 4 * page, End: 5 * page}},
		{"spanning a boundary", 5*page - 1, 5*page + 1, keymem.Range{Start: 4 * page, End: 6 * page}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var r keymem.Registry
			var seen [][]keymem.Range
			stop := r.Watch(func(rs []keymem.Range) { seen = append(seen, rs) })
			remove := r.AddRange(tc.start, tc.end)
			if got := r.Ranges(); len(got) != 1 || got[0] != tc.want {
				t.Fatalf("ranges %v, want [%v]", got, tc.want)
			}
			remove()
			remove()
			stop()
			r.AddRange(0, page) // not seen: the watcher stopped
			want := [][]keymem.Range{{}, {tc.want}, {}}
			if !slices.EqualFunc(seen, want, func(a, b []keymem.Range) bool { return slices.Equal(a, b) }) {
				t.Errorf("watcher saw %v, want %v", seen, want)
			}
		})
	}
}

// TestBuffer: each way to make a Buffer registers its pages before the
// caller sees a key byte, and Destroy removes them and wipes the bytes.
func TestBuffer(t *testing.T) {
	src := []byte("0123456789abcdef0123456789abcdef")
	for _, tc := range []struct {
		name string
		make func() (*keymem.Buffer, error)
		size int
	}{
		{"New", func() (*keymem.Buffer, error) { return keymem.New(64) }, 64},
		{"Random", func() (*keymem.Buffer, error) { return keymem.Random(32) }, 32},
		{"FromBytes", func() (*keymem.Buffer, error) { return keymem.FromBytes(src) }, 32},
		{"Wrap", func() (*keymem.Buffer, error) { return keymem.Wrap(memguard.NewBufferRandom(16)), nil }, 16},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := len(keymem.Default.Ranges())
			b, err := tc.make()
			if err != nil {
				t.Fatal(err)
			}
			if b.Size() != tc.size {
				t.Fatalf("size %d, want %d", b.Size(), tc.size)
			}
			rs := keymem.Default.Ranges()
			addr := uint64(uintptrOf(b.Bytes()))
			covered := false
			for _, r := range rs {
				covered = covered || (addr >= r.Start && addr+uint64(tc.size) <= r.End)
			}
			if len(rs) != before+1 || !covered {
				t.Fatalf("ranges %v: the buffer at %#x is not registered", rs, addr)
			}
			b.Destroy()
			b.Destroy()
			if got := len(keymem.Default.Ranges()); got != before {
				t.Fatalf("%d ranges after Destroy, want %d", got, before)
			}
		})
	}
	if !bytes.Equal(src, make([]byte, len(src))) {
		t.Error("FromBytes left its source on the heap")
	}
}

// TestLockRefusedIsAnError: where mlock is refused (an unprivileged user
// over RLIMIT_MEMLOCK), New returns ErrLock instead of memguard's panic,
// which would wipe every other key first.
func TestLockRefusedIsAnError(t *testing.T) {
	if os.Getenv("KEYMEM_CHILD") != "" {
		_, err := keymem.New(4 << 20)
		if errors.Is(err, keymem.ErrLock) {
			os.Exit(3)
		}
		os.Exit(4)
	}
	cmd := testutil.NobodyCommand(t, "^TestLockRefusedIsAnError$", "prlimit", "--memlock=65536")
	cmd.Env = append(os.Environ(), "KEYMEM_CHILD=1")
	out, err := cmd.CombinedOutput()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 3 {
		t.Fatalf("child over RLIMIT_MEMLOCK: %v, want exit 3 (ErrLock)\n%s", err, out)
	}
}
