package boot

import (
	"errors"
	"fmt"
	"os"

	"github.com/keygate/keygate/disk"
	"github.com/keygate/keygate/disk/nbd"
	"github.com/keygate/keygate/disk/ninep"
	"github.com/keygate/keygate/internal/unixsock"
)

// ErrTwoExports refuses serving one volume both ways at once.
var ErrTwoExports = errors.New("boot: --serve-9p and --serve-nbd/--attach are exclusive: a kernel's ext4 on the block device and go-diskfs behind 9P would both write the volume and corrupt it; choose one")

func (c Config) blockExport() bool { return c.ServeNBD != "" || c.Attach != "" }

// listen makes a private socket (0600 from its first instant) that admits
// root, this process's uid and cfg.AllowUIDs.
func (b *Boot) listen(path string) (*unixsock.Listener, error) {
	ln, err := unixsock.Listen(path, b.cfg.AllowUIDs...)
	if err != nil {
		return nil, fmt.Errorf("boot: %w", err)
	}
	ln.OnRefused = func(uid int64, err error) {
		b.log.Warn("refused a connection to "+path, "uid", uid, "err", err)
	}
	return ln, nil
}

// serve9P starts the 9P server on a unix socket at path.
func (b *Boot) serve9P(path string) error {
	ln, err := b.listen(path)
	if err != nil {
		return err
	}
	b.ln = ln
	b.srv = ninep.NewServer(b.fs, ninep.WithLogger(b.log))
	go func() { b.serveErr <- b.srv.Serve(ln) }()
	b.emit(Event{Kind: EventServing, Message: "serving 9P2000.L on " + path + " (mount -t 9p -o trans=unix,version=9p2000.L " + path + " /mnt)"})
	return nil
}

// serveNBD starts the NBD export of the data segment: on a socket, on the
// kernel's NBD device, or both.
func (b *Boot) serveNBD() error {
	blocks := b.im.Blocks()
	ss := uint32(blocks.SectorSize())
	b.nbd = nbd.NewServer(blocks, nbd.Options{MinBlock: ss, PreferredBlock: ss, Log: b.log})
	if path := b.cfg.ServeNBD; path != "" {
		ln, err := b.listen(path)
		if err != nil {
			return err
		}
		b.nbdLn = ln
		go func() {
			err := b.nbd.Serve(ln)
			if errors.Is(err, nbd.ErrServerClosed) {
				err = nil // the lock closed it
			}
			b.serveErr <- err
		}()
		b.emit(Event{Kind: EventServing, Message: "serving NBD on " + path + " (qemu-img, nbdcopy: nbd+unix:///?socket=" + path + ")"})
	}
	if dev := b.cfg.Attach; dev != "" {
		att, err := nbd.Attach(dev, b.nbd, ss)
		if err != nil {
			return fmt.Errorf("boot: %w", err)
		}
		b.att = att
		go func() {
			// A device the kernel dropped on its own (the server failed,
			// nbd-client -d) no longer serves: lock, as a failed server
			// does. After Close (the lock itself) the send finds a full
			// channel or no reader, and is dropped.
			<-att.Done()
			if !b.closing.Load() {
				err := att.Err()
				select {
				case b.serveErr <- fmt.Errorf("kernel NBD device %s stopped: %v", dev, err):
				default:
				}
			}
		}()
		b.emit(Event{Kind: EventServing, Message: fmt.Sprintf("%s attached (%d-byte blocks): mount %s /mnt", dev, ss, dev)})
	}
	return nil
}

// testHookStopServing, set by tests only, runs as stopServing starts: a
// stand-in for a teardown that waits on a disk that stopped answering
// (disk's TestWipeWhileDiskHangs stalls a real pread).
var testHookStopServing func()

// stopServing ends every export before the image is closed: the kernel's
// device first (its queued I/O fails: after a revoke nothing more may
// reach the volume), then the servers, which wait for requests under way.
func (b *Boot) stopServing() []error {
	if testHookStopServing != nil {
		testHookStopServing()
	}
	var errs []error
	if b.att != nil {
		errs = append(errs, b.att.Close())
		b.att = nil
	}
	if b.nbd != nil {
		errs = append(errs, b.nbd.Close())
	}
	if b.nbdLn != nil {
		b.nbdLn.Close()
	}
	if b.srv != nil {
		errs = append(errs, b.srv.Close())
		os.Remove(b.cfg.Serve9P)
	} else if b.ln != nil {
		b.ln.Close()
	}
	return errs
}

// repairForKernel makes, before the kernel mounts the volume, the repairs
// that a 9P session a crash interrupted left for the next writable open of
// keygate's (the intent record of an in-place flush, a torn superblock):
// the kernel knows nothing of them. A volume keygate cannot read (no
// filesystem, a raw disk, an ext4 with features go-diskfs lacks, or a
// journal the kernel must replay) is the kernel's alone, and left as is.
func (b *Boot) repairForKernel() {
	fsys, err := disk.OpenFS(b.im.Device())
	if err != nil {
		b.log.Debug("the block export's filesystem is the kernel's alone", "why", err)
		return
	}
	if err := fsys.Close(); err != nil {
		b.log.Warn("closing the filesystem after its repair failed; the kernel's e2fsck or journal replay will see it", "err", err)
	}
}

// NBDSocket is the NBD socket path, or "".
func (b *Boot) NBDSocket() string { return b.cfg.ServeNBD }
