package disk

import (
	"errors"
	"fmt"
	"os"

	"github.com/keygate/keygate/disk/luks2"
	"golang.org/x/sys/unix"
)

// ErrImageBusy means another open file holds the image: a keygate boot or
// disk serve that is still running, or a second command started beside one.
var ErrImageBusy = errors.New("the image is open in another keygate process (a running keygate boot, disk serve or disk command): stop that one first, since two writers corrupt the volume")

// lockImage takes a BSD lock on the image for as long as f stays open:
// shared for readers, exclusive for a writer. Two writers (the guest
// kernel's ext4 behind one export and go-diskfs behind another, or a key
// rotation under a serving boot) would each keep their own view of the
// filesystem's free blocks and overwrite each other's data; a reader beside
// a writer sees half-written metadata. The lock never waits: the user
// learns at once which command to stop. flock locks belong to the open file,
// so the lock goes when f is closed, and the kernel drops it when a process
// dies, so a crash leaves nothing to clean up.
func lockImage(f *os.File, path string, exclusive bool) error {
	how := unix.LOCK_SH
	if exclusive {
		how = unix.LOCK_EX
	}
	for {
		err := unix.Flock(int(f.Fd()), how|unix.LOCK_NB)
		switch {
		case err == nil:
			return nil
		case errors.Is(err, unix.EINTR):
			continue
		case errors.Is(err, unix.EWOULDBLOCK):
			return fmt.Errorf("open %s: %w", path, ErrImageBusy)
		case errors.Is(err, unix.ENOLCK), errors.Is(err, unix.EOPNOTSUPP):
			// Some network filesystems have no flock; the image is
			// still usable, only unguarded.
			return nil
		default:
			return fmt.Errorf("lock %s: %w", path, err)
		}
	}
}

// openHeader opens the image read-write for a change to its header (a
// keyslot added, removed, or rotated), holding the writer's lock, and
// parses the header.
func openHeader(path string) (*os.File, *luks2.Volume, error) {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return nil, nil, fmt.Errorf("open image: %w", err)
	}
	if err := lockImage(f, path, true); err != nil {
		f.Close()
		return nil, nil, err
	}
	vol, err := luks2.Open(f)
	if err != nil {
		f.Close()
		return nil, nil, fmt.Errorf("open %s: %w", path, err)
	}
	return f, vol, nil
}
