package main

import (
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/keygate/keygate/disk"
	"github.com/keygate/keygate/disk/nbd"
	"github.com/keygate/keygate/internal/cli"
	"github.com/keygate/keygate/internal/unixsock"
)

// allowUIDFlag registers --allow-uid for commands that serve a socket.
func allowUIDFlag(f *pflag.FlagSet, uids *[]uint32) {
	f.Var(&uidList{uids}, "allow-uid", "also admit peers running as this uid on the socket (repeatable; root and the serving user always may)")
}

type uidList struct{ p *[]uint32 }

func (u *uidList) String() string {
	if u.p == nil {
		return ""
	}
	return fmt.Sprint(*u.p)
}
func (u *uidList) Type() string { return "uid" }
func (u *uidList) Set(s string) error {
	var v uint32
	if _, err := fmt.Sscanf(s, "%d", &v); err != nil || fmt.Sprint(v) != s {
		return fmt.Errorf("%q is not a numeric uid (use id -u USER)", s)
	}
	*u.p = append(*u.p, v)
	return nil
}

func diskServeCmd() *cobra.Command {
	var (
		keyFile, sock string
		readOnly      bool
		allowUIDs     []uint32
	)
	c := &cobra.Command{
		Use:   "serve IMAGE --key-file F --nbd SOCKET",
		Short: "Serve the volume as an NBD block device on a unix socket, until interrupted",
		Long: `Serve the plaintext view of IMAGE's data segment over NBD on a unix socket,
for image pipelines: whatever an NBD client writes is encrypted into IMAGE.
For example, to turn a plain disk image into an encrypted keygate volume:

  keygate disk create vol.img --size 10G --key-file vol.key      # no --fs
  keygate disk serve vol.img --key-file vol.key --nbd /run/vol.sock &
  qemu-img convert -n -f raw -O raw plain.raw 'nbd+unix:///?socket=/run/vol.sock'
  nbdcopy 'nbd+unix:///?socket=/run/vol.sock' check.raw          # read it back

The export advertises the volume's sector size as its block size, FLUSH,
FUA, WRITE_ZEROES and multi-connection; a FLUSH answers once the image is
durable (fdatasync). Ctrl-C or SIGTERM stops serving, syncs the image and
wipes the key. The socket is 0600 from its first instant and admits only
root, this user and --allow-uid. Do not open the volume any other way (disk
put, keygate boot) while it is served. See docs/disk.md.`,
		Args: cli.ExactArgs("IMAGE"),
		RunE: func(c *cobra.Command, args []string) error {
			if sock == "" {
				return cli.Usagef(c, "--nbd SOCKET is required: the unix socket to serve on")
			}
			key, err := needKey(c, keyFile)
			if err != nil {
				return err
			}
			im, err := disk.OpenImage(args[0], key, !readOnly)
			key.Destroy()
			if err != nil {
				return err
			}
			return serveImage(c, im, sock, allowUIDs)
		},
	}
	keyFlag(c, &keyFile)
	c.Flags().StringVar(&sock, "nbd", "", "unix socket to serve NBD on")
	c.Flags().BoolVar(&readOnly, "read-only", false, "serve read-only")
	allowUIDFlag(c.Flags(), &allowUIDs)
	return c
}

// serveImage serves im's block view on sock until a signal, then closes
// everything in the order that keeps data: no request under way, image
// synced, key wiped.
func serveImage(c *cobra.Command, im *disk.Image, sock string, allowUIDs []uint32) (err error) {
	defer func() {
		if cerr := im.Close(); err == nil && cerr != nil {
			err = fmt.Errorf("close image: %w", cerr)
		}
	}()
	log := slog.New(slog.NewTextHandler(c.ErrOrStderr(), nil))
	ln, err := unixsock.Listen(sock, allowUIDs...)
	if err != nil {
		return err
	}
	ln.OnRefused = func(uid int64, err error) { log.Warn("refused a connection", "uid", uid, "err", err) }
	b := im.Blocks()
	ss := uint32(b.SectorSize())
	srv := nbd.NewServer(b, nbd.Options{ReadOnly: b.ReadOnly(), MinBlock: ss, PreferredBlock: ss, Log: log})
	ctx, stop := signal.NotifyContext(c.Context(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	fmt.Fprintf(c.OutOrStdout(), "serving %d bytes (%d-byte sectors) on nbd+unix:///?socket=%s; Ctrl-C to stop\n", b.Size(), ss, sock)
	select {
	case <-ctx.Done():
		srv.Close()
		<-served
		return nil
	case err := <-served:
		srv.Close()
		return err
	}
}
