package boot

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	tpmpb "github.com/google/go-tpm-tools/proto/tpm"
	"google.golang.org/protobuf/proto"

	"github.com/keygate/keygate/disk"
	"github.com/keygate/keygate/disk/luks2"
	"github.com/keygate/keygate/disk/nbd"
	"github.com/keygate/keygate/disk/ninep"
	"github.com/keygate/keygate/ebpfmon"
	"github.com/keygate/keygate/keymem"
	"github.com/keygate/keygate/keysvc/api"
	"github.com/keygate/keygate/keysvc/client"
	"github.com/keygate/keygate/tpm"
)

// Defaults of Config.
const (
	DefaultPoll     = 30 * time.Second
	DefaultRetryMin = 250 * time.Millisecond
	DefaultRetryMax = 10 * time.Second
)

// ErrRevoked is what Wait returns once the key service revoked the session
// (a revoked VM or an erased volume) and the volume was locked.
var ErrRevoked = errors.New("session revoked by the key service; keys wiped and volume closed")

// Config says what to unlock and how.
type Config struct {
	// KeysvcURL is the VM API's base URL (https://HOST:PORT), or the base
	// URLs of several replicas separated by commas, tried in that order
	// (see keysvc/client for the failover rules). Empty takes the URLs
	// from the volume's keygate token.
	KeysvcURL string
	// ConnectTimeout bounds the connect and TLS handshake to one replica
	// before the next is tried (client.DefaultConnectTimeout with several
	// URLs, client.SingleConnectTimeout with one).
	ConnectTimeout time.Duration
	// CA is the key service's CA certificate (PEM, DATA/ca.pem). Nil pins
	// the CA fingerprint of the volume's keygate token instead; when both
	// are there they must agree.
	CA []byte
	// VM is the name the VM is enrolled under (required).
	VM string
	// Volume is the volume's ID at the key service; empty takes the token's.
	Volume string
	// Image is the LUKS2 image file or block device (required).
	Image string
	// TPM is an open TPM to use (the caller keeps it); otherwise TPMSpec
	// (tpm.Open's spec) is opened and closed by the Boot.
	TPM     *tpm.TPM
	TPMSpec string
	// Alg is the EK and AK algorithm (ECC by default).
	Alg tpm.Alg
	// InitIfBlank provisions a blank Image (no LUKS2 header, zeros at the
	// start) through the key service and formats it with InitFS (ext4 by
	// default). Anything else is never formatted.
	InitIfBlank bool
	InitFS      disk.FSType
	// Serve9P, when set, is the unix socket path the 9P2000.L server
	// listens on.
	Serve9P string
	// ServeNBD, when set, is the unix socket path the NBD server listens
	// on: the volume's data segment as a block device, for a kernel to
	// run its own filesystem on. Exclusive with Serve9P: two writers (a
	// kernel's ext4 and go-diskfs) would corrupt the volume.
	ServeNBD string
	// Attach, when set, is a kernel NBD device (/dev/nbdN) that Run
	// connects to the NBD export, so that it can be mounted once Run
	// returns. It needs root and the nbd module; it implies the NBD
	// export even without ServeNBD.
	Attach string
	// AllowUIDs are the uids, besides root and this process's, that may
	// connect to the 9P or NBD socket (checked with SO_PEERCRED).
	AllowUIDs []uint32
	// Poll is the heartbeat period, and so the bound on how long a revoke
	// takes to lock the volume (DefaultPoll if zero).
	Poll time.Duration
	// RetryMin and RetryMax bound the backoff while the key service is
	// unreachable at boot; MaxWait, if set, gives up after that long.
	RetryMin, RetryMax, MaxWait time.Duration
	// Log receives the console lines (slog.Default if nil).
	Log *slog.Logger
	// OnEvent, if set, is called for every Event, synchronously; it must
	// not block for long.
	OnEvent func(Event)
	// Monitor runs the key-page monitor (ebpfmon) in this process from
	// before the unlock until the lock: every attempt by another process
	// to read this process's memory is reported to Log, OnEvent
	// (EventAlert) and the key service's /v1/events. It needs root; Run
	// fails, before any key is released, when the monitor cannot start.
	Monitor bool
	// OnAlert is what an alert does: AlertLog (the default) or AlertLock.
	OnAlert AlertAction
	// Reattest is how often the serving VM quotes its PCRs again over its
	// session (POST /v1/reattest); a quote the key service finds off
	// policy locks the volume as a revoke does (ErrReattest). Zero turns
	// it off (keygate boot's --reattest defaults to DefaultReattest).
	Reattest time.Duration
	// MonitorMinSeverity is the lowest severity of the monitor's events
	// that reach Log, OnEvent and the key service (default warning); those
	// below are only counted. ebpfmon.Info passes them all.
	MonitorMinSeverity ebpfmon.Severity
}

// EventKind names a step of the flow that a driver (keygate demo, a test)
// may want to follow.
type EventKind string

// The events Run and the heartbeat report.
const (
	EventWaiting           EventKind = "waiting"            // key service unreachable at boot; retrying
	EventUnlocked          EventKind = "unlocked"           // volume open, window PCR extended
	EventServing           EventKind = "serving"            // 9P socket accepting
	EventOutage            EventKind = "outage"             // heartbeat failed; volume stays open
	EventReconnected       EventKind = "reconnected"        // heartbeat answered again after an outage
	EventLocked            EventKind = "locked"             // keys wiped, volume closed, serving stopped
	EventMonitoring        EventKind = "monitoring"         // the key-page monitor runs; the message says its mode and why
	EventAlert             EventKind = "alert"              // the monitor saw an attempt at this process's memory (Event.Alert)
	EventRotated           EventKind = "rotated"            // the image now opens with the key service's new UK alone, and the service destroyed the old one
	EventRotation          EventKind = "rotation"           // a pending rotation was not completed in this boot (Err says why); the next boot resumes it
	EventRotationCancelled EventKind = "rotation-cancelled" // the operator cancelled the rotation: the image opens with the current UK alone, and the service destroyed the pending one
	EventReattested        EventKind = "reattested"         // a re-attestation while serving passed

)

// Event is one step; Err is set for EventWaiting, EventOutage and, when the
// lock was not asked for by Close, EventLocked.
type Event struct {
	Kind    EventKind
	Message string
	Err     error
	Alert   *ebpfmon.Event // for EventAlert
}

// Boot is an unlocked volume and what keeps it: the 9P server, if any, and
// the heartbeat. Close locks it.
type Boot struct {
	cfg     Config
	log     *slog.Logger
	cl      *client.Client
	tpm     *tpm.TPM
	ownTPM  bool
	session string
	// rotCancelling: the unlock said the pending rotation was cancelled
	rotCancelling bool
	im            *disk.Image
	fs            *disk.FS
	srv           *ninep.Server
	ln            net.Listener
	nbd           *nbd.Server
	nbdLn         net.Listener
	att           *nbd.Attachment
	mon           *monitor

	stop     context.CancelFunc
	hbDone   chan struct{}
	raDone   chan struct{} // closed when the re-attestation loop ends
	lockOnce sync.Once
	closing  atomic.Bool // set when the lock starts
	done     chan struct{}
	err      error
	closeErr error
	serveErr chan error
	tornDown chan struct{} // closed when a forced lock's teardown ends
}

// Run unlocks the volume (see the package comment for the steps) and, with
// Serve9P, starts serving it. It returns once the volume is unlocked and
// serving, or with the reason it could not be: a *Refusal (errors.Is
// ErrRefused) carrying the service's diagnostics, ErrTLS for an untrusted
// certificate, or ctx's error while it was still waiting for an unreachable
// service. Nothing that holds a key is ever written anywhere.
func Run(ctx context.Context, cfg Config) (_ *Boot, err error) {
	if cfg.VM == "" || cfg.Image == "" {
		return nil, errors.New("boot: --vm and --image are required")
	}
	if cfg.Poll <= 0 {
		cfg.Poll = DefaultPoll
	}
	if cfg.RetryMin <= 0 {
		cfg.RetryMin = DefaultRetryMin
	}
	if cfg.RetryMax < cfg.RetryMin {
		cfg.RetryMax = max(DefaultRetryMax, cfg.RetryMin)
	}
	if cfg.InitFS == "" {
		cfg.InitFS = disk.Ext4
	}
	switch {
	case cfg.OnAlert == "":
		cfg.OnAlert = AlertLog
	case cfg.OnAlert != AlertLog && cfg.OnAlert != AlertLock:
		return nil, fmt.Errorf("boot: on-alert %q: use log or lock", cfg.OnAlert)
	}
	if cfg.Serve9P != "" && (cfg.ServeNBD != "" || cfg.Attach != "") {
		return nil, ErrTwoExports
	}
	if cfg.OnAlert == AlertLock && !cfg.Monitor {
		return nil, errors.New("boot: --on-alert lock needs --monitor (there are no alerts without the monitor)")
	}
	b := &Boot{cfg: cfg, log: cfg.Log, done: make(chan struct{}), serveErr: make(chan error, 1)}
	if b.log == nil {
		b.log = slog.Default()
	}
	b.log.Info("memory protection", slog.String("keys", MemoryProtection()))
	defer func() {
		if err != nil {
			b.release()
		}
	}()

	st, err := inspect(cfg.Image)
	if err != nil {
		return nil, err
	}
	blank := false
	switch {
	case !st.luks && !st.zero:
		return nil, fmt.Errorf("boot: %s has no LUKS2 header and holds data (a non-zero byte at offset %d); keygate formats only blank devices, so nothing was written", cfg.Image, st.nonZeroAt)
	case !st.luks && !cfg.InitIfBlank:
		return nil, fmt.Errorf("boot: %s is blank (no LUKS2 header, zeros at the start); pass --init-if-blank to provision it through the key service", cfg.Image)
	case !st.luks:
		blank = true
	}
	urls, pin, volume := client.ParseURLs(cfg.KeysvcURL), "", cfg.Volume
	if st.token != nil {
		pin = st.token.CASHA256
		if len(urls) == 0 {
			urls = st.token.URLs()
		}
		if volume == "" {
			volume = st.token.VolumeID
		} else if volume != st.token.VolumeID {
			return nil, fmt.Errorf("boot: --volume %q is not the volume %q named in %s's keygate token", volume, st.token.VolumeID, cfg.Image)
		}
	}
	if len(urls) == 0 || volume == "" {
		return nil, fmt.Errorf("boot: %s has no keygate token, so --keysvc and --volume are required (or create the volume with `keygate disk create --keysvc URL --volume ID`)", cfg.Image)
	}
	if b.cl, err = newClient(urls, cfg.CA, pin, cfg.ConnectTimeout); err != nil {
		return nil, fmt.Errorf("boot: %w", err)
	}
	if cfg.TPM != nil {
		b.tpm = cfg.TPM
	} else {
		if b.tpm, err = tpm.Open(cfg.TPMSpec); err != nil {
			return nil, fmt.Errorf("boot: %w", err)
		}
		b.ownTPM = true
	}

	// Before the first key byte arrives: no core file, and no
	// /proc/PID/mem or ptrace for anyone but root, from here on.
	if err := keymem.HardenProcess(); err != nil {
		return nil, fmt.Errorf("boot: harden process: %w", err)
	}
	if cfg.Monitor {
		if err := b.startMonitor(); err != nil {
			return nil, err
		}
	}
	// The handshake overlaps the TPM's EK and AK creation, which the
	// challenge needs first; it starts after the hardening and the
	// monitor, where the challenge's connection used to.
	b.cl.Warm()
	uk, next, err := b.unlock(ctx, volume, blank)
	if err != nil {
		return nil, err
	}
	defer uk.Destroy()
	if next != nil {
		defer next.Destroy()
	}
	if blank {
		if err := formatBlank(cfg.Image, uk.Bytes(), luks2.KeygateToken{URL: urls[0], MoreURLs: urls[1:], VolumeID: volume, CASHA256: pinFor(cfg.CA, pin)}, cfg.InitFS); err != nil {
			return nil, fmt.Errorf("boot: provision %s: %w (the key service made the volume's key but the device is still blank: erase the volume with `keysvc erase --volume %s` and provision the device under a new --volume ID)", cfg.Image, err, volume)
		}
		b.log.Info("provisioned blank volume", slog.String("image", cfg.Image), slog.String("volume", volume), slog.String("fs", string(cfg.InitFS)))
	}
	open := uk
	if next != nil && !blank {
		// A rotation is pending at the key service (rotate.go), or
		// cancelled after its key was released (rotate_cancel.go).
		rot := b.rotate
		if b.rotCancelling {
			rot = b.cancelRotation
		}
		if open, err = rot(ctx, volume, uk, next); err != nil {
			return nil, err
		}
	}
	key, err := disk.NewKey(open.Bytes())
	if err == nil {
		b.im, err = disk.OpenImage(cfg.Image, key, true)
		key.Destroy()
	}
	uk.Destroy()
	if next != nil {
		next.Destroy()
	}
	if err != nil {
		return nil, fmt.Errorf("boot: %w", err)
	}
	if cfg.blockExport() {
		// The kernel's filesystem owns the volume: go-diskfs stays out,
		// but for the repairs a crashed 9P session left for keygate.
		b.repairForKernel()
		b.emit(Event{Kind: EventUnlocked, Message: fmt.Sprintf("volume %s unlocked (block export); PCR %d extended", volume, tpm.WindowPCR)})
		if err := b.serveNBD(); err != nil {
			return nil, err
		}
	} else {
		if b.fs, err = b.im.FS(); err != nil {
			return nil, fmt.Errorf("boot: %s: %w", cfg.Image, err)
		}
		b.emit(Event{Kind: EventUnlocked, Message: fmt.Sprintf("volume %s unlocked (%s); PCR %d extended", volume, b.fs.Type(), tpm.WindowPCR)})
		if cfg.Serve9P != "" {
			if err := b.serve9P(cfg.Serve9P); err != nil {
				return nil, err
			}
		}
	}
	hctx, stop := context.WithCancel(context.Background())
	b.stop, b.hbDone = stop, make(chan struct{})
	go b.heartbeat(hctx)
	if cfg.Reattest > 0 {
		b.raDone = make(chan struct{})
		go b.reattest(hctx, volume)
	}
	b.monitorServing()
	return b, nil
}

func pinFor(caPEM []byte, pin string) string {
	if pin != "" {
		return pin
	}
	fp, _ := CAFingerprint(caPEM)
	return fp
}

// unlock runs challenge, attest and unlock (or provision) until the key
// service answers, then imports the blob (and, while a rotation is pending,
// the next UK's) and closes the window. The UKs it returns are the caller's
// to destroy; next is nil unless a rotation is pending.
func (b *Boot) unlock(ctx context.Context, volume string, provision bool) (uk, next *tpm.Secret, err error) {
	ek, err := b.tpm.EK(b.cfg.Alg)
	if err != nil {
		return nil, nil, fmt.Errorf("boot: %w", err)
	}
	ak, err := b.tpm.AK(b.cfg.Alg)
	if err != nil {
		return nil, nil, fmt.Errorf("boot: %w", err)
	}
	ekPEM, err := ek.PEM()
	if err != nil {
		return nil, nil, err
	}
	akPEM, err := ak.PEM()
	if err != nil {
		return nil, nil, err
	}
	var ur *api.UnlockResponse
	start, delay := time.Now(), b.cfg.RetryMin
	for {
		ur, err = b.attempt(ctx, api.ChallengeRequest{VM: b.cfg.VM, Volume: volume, EKPub: string(ekPEM), AKPub: string(akPEM)}, provision)
		var ue *UnreachableError
		if !errors.As(err, &ue) {
			break
		}
		// The service may ask for a longer wait (503 with Retry-After
		// while its database is away); never wait less than it asks.
		wait := max(delay, min(ue.RetryAfter(), b.cfg.RetryMax))
		if b.cfg.MaxWait > 0 && time.Since(start)+wait > b.cfg.MaxWait {
			return nil, nil, fmt.Errorf("boot: gave up after %s: %w", time.Since(start).Round(time.Millisecond), err)
		}
		b.emit(Event{Kind: EventWaiting, Err: err, Message: fmt.Sprintf("key service %s unreachable (%v); retrying in %s", strings.Join(b.cl.URLs(), ","), ue.Err, wait)})
		select {
		case <-ctx.Done():
			return nil, nil, fmt.Errorf("boot: stopped while waiting for the key service: %w", ctx.Err())
		case <-time.After(wait):
		}
		delay = min(delay*2, b.cfg.RetryMax)
	}
	var r *Refusal
	if provision && errors.As(err, &r) && (r.Reason == api.ReasonUnknownVolume || r.Reason == api.ReasonNoProvisioning) {
		return nil, nil, fmt.Errorf("boot: provision volume %s: %w (this VM may not provision volumes: enroll it with provisioning allowed, or create the volume with `keygate disk create --keysvc`)", volume, err)
	}
	if err != nil {
		return nil, nil, fmt.Errorf("boot: volume %s: %w", volume, err)
	}
	blob := &tpmpb.ImportBlob{}
	if err := proto.Unmarshal(ur.ImportBlob, blob); err != nil {
		return nil, nil, fmt.Errorf("boot: the key service's import blob does not parse: %v", err)
	}
	uk, ierr := b.tpm.Import(blob, b.cfg.Alg)
	if ierr == nil && ur.NextImportBlob != nil {
		// Before the window closes: the pending UK is bound to it too.
		next = b.importNext(ur.NextImportBlob)
	}
	// Close the window whatever Import did: from here on nothing in this
	// boot can have the same blob, or a new one, imported or released.
	xerr := b.tpm.Extend(tpm.WindowPCR, api.UnlockDoneEvent(volume))
	if ierr != nil {
		return nil, nil, fmt.Errorf("boot: TPM import of the key service's blob: %w", ierr)
	}
	if xerr != nil {
		uk.Destroy()
		if next != nil {
			next.Destroy()
		}
		return nil, nil, fmt.Errorf("boot: extend PCR %d after unlock: %w", tpm.WindowPCR, xerr)
	}
	b.session = ur.Session
	b.rotCancelling = next != nil && ur.RotationCancelling
	b.monitorSession()
	return uk, next, nil
}

// attempt is one challenge-quote-unlock (or provision) round trip. The
// challenge may come from one replica and be redeemed at another.
//
// When the unlock failed over after the first replica took the request
// and broke off, that replica may have used the challenge up, and the next
// one refuses it as replayed: that refusal is about the token, not about
// the VM, so the round trip runs once more with a fresh challenge.
func (b *Boot) attempt(ctx context.Context, req api.ChallengeRequest, provision bool) (*api.UnlockResponse, error) {
	for try := 0; ; try++ {
		ch, err := b.cl.Challenge(ctx, req)
		if err != nil {
			return nil, err
		}
		raw, err := b.quote(api.QuoteData(ch.Nonce, b.cl.CASHA256()))
		if err != nil {
			return nil, err
		}
		first := b.cl.Current()
		ureq := api.UnlockRequest{Challenge: ch.Challenge, Attestation: raw}
		var ur *api.UnlockResponse
		if provision {
			ur, err = b.cl.Provision(ctx, ureq)
		} else {
			ur, err = b.cl.Unlock(ctx, ureq)
		}
		var r *Refusal
		if try == 0 && b.cl.Current() != first && errors.As(err, &r) && r.Reason == api.ReasonChallenge {
			continue
		}
		return ur, err
	}
}

func (b *Boot) emit(ev Event) {
	lvl := slog.LevelInfo
	if ev.Err != nil {
		lvl = slog.LevelWarn
	}
	b.log.Log(context.Background(), lvl, ev.Message, slog.String("event", string(ev.Kind)))
	if b.cfg.OnEvent != nil {
		b.cfg.OnEvent(ev)
	}
}

// FS is the unlocked filesystem; after the lock its calls fail. It is nil
// with a block export (ServeNBD, Attach).
func (b *Boot) FS() *disk.FS { return b.fs }

// Socket is the 9P socket path, or "".
func (b *Boot) Socket() string { return b.cfg.Serve9P }

// Done is closed once the volume is locked.
func (b *Boot) Done() <-chan struct{} { return b.done }

// Wait blocks until the volume is locked and returns why: ErrRevoked, the
// 9P server's failure, or nil after Close.
func (b *Boot) Wait() error {
	<-b.done
	return b.err
}

// Close locks the volume (flushing what 9P clients wrote), stops the
// heartbeat and releases the TPM if Run opened it.
func (b *Boot) Close() error {
	b.lock(nil)
	if b.hbDone != nil {
		<-b.hbDone
	}
	if b.raDone != nil {
		<-b.raDone
	}
	return b.closeErr
}

// lock wipes the keys and closes the volume once; why is what Wait returns.
func (b *Boot) lock(why error) {
	b.lockOnce.Do(func() {
		b.closing.Store(true)
		b.err = why
		if why == nil {
			b.closeErr = b.release()
		} else {
			b.closeErr = b.releaseWithin(forcedWipeAfter)
		}
		msg := "volume locked: keys wiped, volume closed"
		if why != nil {
			msg = "volume locked: " + why.Error()
		}
		b.emit(Event{Kind: EventLocked, Message: msg, Err: why})
		close(b.done)
	})
}

// forcedWipeAfter bounds how long a lock that the key service, the monitor
// or a failed export forces waits for the volume to close in order (the
// exports' requests under way, the last flush) before it wipes the keys
// regardless. A disk that stopped answering (a network volume's pread can
// hang for minutes) must not keep a revoked volume's key in memory; what
// was not yet written when the keys go is lost, as if the VM had stopped.
// A lock of the user's own (Close) waits for the disk: it keeps data.
const forcedWipeAfter = 5 * time.Second

// releaseWithin is release, but wipes the volume's keys after d even if the
// teardown still waits; the teardown then goes on in the background, and
// every request still under way fails with disk.ErrKeyWiped.
func (b *Boot) releaseWithin(d time.Duration) error {
	im := b.im // release drops it
	done := make(chan error, 1)
	b.tornDown = make(chan struct{})
	go func() {
		defer close(b.tornDown)
		done <- b.release()
	}()
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case err := <-done:
		return err
	case <-t.C:
	}
	err := fmt.Errorf("the volume did not close within %s (is its disk answering?); its keys were wiped without waiting, and writes still under way are lost", d)
	if im != nil {
		if werr := im.Wipe(); werr != nil {
			err = fmt.Errorf("%w; wiping the keys: %v", err, werr)
		}
	}
	b.log.Error("volume locked without waiting for its disk", "err", err)
	return err
}

// release tears down whatever Run set up, in the order that keeps data:
// 9P first (its Close syncs the filesystem), then the image (which wipes
// the key schedule).
func (b *Boot) release() error {
	if b.stop != nil {
		b.stop()
	}
	errs := b.stopServing()
	if b.im != nil {
		errs = append(errs, b.im.Close())
		b.im = nil
	}
	// After the wipe, so that the keys are watched until they are gone;
	// before the client closes, so that queued alerts still reach the key
	// service.
	errs = append(errs, b.stopMonitor())
	if b.cl != nil {
		b.cl.Close()
	}
	if b.ownTPM && b.tpm != nil {
		errs = append(errs, b.tpm.Close())
		b.tpm = nil
	}
	return errors.Join(errs...)
}
