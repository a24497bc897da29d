package boot

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sync"

	"github.com/keygate/keygate/ebpfmon"
	"github.com/keygate/keygate/ebpfmon/keysvcsink"
	"github.com/keygate/keygate/keymem"
	"github.com/keygate/keygate/keysvc/api"
)

// AlertAction is what a monitor alert does (Config.OnAlert).
type AlertAction string

const (
	// AlertLog reports every alert (console log, key service) and nothing
	// more.
	AlertLog AlertAction = "log"
	// AlertLock also locks the volume, as a revoke does, on the first
	// critical alert: an access that could reach the key pages.
	AlertLock AlertAction = "lock"
)

// ErrAlert matches (errors.Is) the *AlertError Wait returns after
// --on-alert lock locked the volume.
var ErrAlert = errors.New("locked on a critical monitor alert")

// AlertError is why the volume was locked under AlertLock: the first
// critical event.
type AlertError struct{ Event ebpfmon.Event }

func (e *AlertError) Error() string {
	return fmt.Sprintf("%v: %s; keys wiped and volume closed (`keysvc events` at the key service lists it)", ErrAlert, e.Event)
}

// Is makes errors.Is(e, ErrAlert) true.
func (e *AlertError) Is(target error) bool { return target == ErrAlert }

// monitor is the key-page monitor of this process and where its events go.
type monitor struct {
	m      *ebpfmon.Monitor
	sink   *keysvcsink.Sink
	cancel context.CancelFunc
	done   chan struct{} // closed when the dispatcher returns
	once   sync.Once
	// session is closed once the key service gave a session (alerts can
	// be posted), quit when the monitor stops (alerts still waiting for a
	// session never will have one).
	session, quit chan struct{}

	mu      sync.Mutex
	serving bool        // Run returned: a lock may proceed
	pending *AlertError // the first critical alert, seen before that
}

// startMonitor loads the BPF programs and protects this process, following
// the key-page registry that every key buffer (package keymem) fills. It
// runs before the unlock, so that the keys are watched from the moment
// they exist, and so that a failure costs nothing: no key was released and
// the window PCR is not yet extended.
func (b *Boot) startMonitor() error {
	m, err := ebpfmon.Start(context.Background(), ebpfmon.Config{Self: keymem.Default, MinSeverity: b.cfg.MonitorMinSeverity})
	if err != nil {
		why := ""
		if os.Geteuid() != 0 {
			why = " (this process is not root)"
		}
		return fmt.Errorf("boot: --monitor: cannot start the key-page monitor%s: %v; run keygate boot as root (the monitor needs CAP_BPF, CAP_PERFMON and tracefs), or drop --monitor to boot without it", why, err)
	}
	b.mon = &monitor{m: m, done: make(chan struct{}), session: make(chan struct{}), quit: make(chan struct{})}
	mode, why := m.Mode()
	what := "attempts to read this process's memory are reported, not denied"
	if mode == ebpfmon.ModeDeny {
		what = "attempts to read this process's memory are reported and denied by the BPF LSM"
	}
	action := "alerts are reported"
	if b.cfg.OnAlert == AlertLock {
		action = "the first critical alert locks the volume"
	}
	b.emit(Event{Kind: EventMonitoring, Message: fmt.Sprintf("key-page monitor running in %s mode (%s): %s; %s", mode, what, why, action)})
	b.dispatchAlerts()
	return nil
}

// dispatchAlerts delivers the monitor's events: first the lock decision,
// then the console, then the key service (whose posts wait for the
// session).
func (b *Boot) dispatchAlerts() {
	mon := b.mon
	mon.sink = keysvcsink.New(eventPoster{b}, 1024)
	sinks := []ebpfmon.Sink{}
	if b.cfg.OnAlert == AlertLock {
		sinks = append(sinks, ebpfmon.OnAlert(ebpfmon.Critical, func(e ebpfmon.Event) {
			mon.mu.Lock()
			defer mon.mu.Unlock()
			if !mon.serving {
				mon.pending = &AlertError{Event: e} // Run locks as soon as it is done
				return
			}
			// lock stops the monitor, which waits for this dispatcher: not here.
			go b.lock(&AlertError{Event: e})
		}))
	}
	sinks = append(sinks, ebpfmon.SinkFunc(b.logAlert), mon.sink)
	ctx, cancel := context.WithCancel(context.Background())
	mon.cancel = cancel
	// Only the key-service sink fails (its queue is full); say so once,
	// stopMonitor gives the count. The console has every alert.
	var once sync.Once
	onErr := func(_ ebpfmon.Sink, err error) {
		once.Do(func() {
			b.log.Warn("monitor: "+err.Error()+"; further drops are counted and reported when the monitor stops", slog.String("event", string(EventAlert)))
		})
	}
	go func() {
		defer close(mon.done)
		ebpfmon.Dispatch(ctx, mon.m.Events(), onErr, sinks...)
		if err := mon.m.Err(); err != nil {
			// The monitor is blind from here on; the heartbeats go on,
			// so say so where the operator looks.
			b.log.Error("monitor: "+err.Error()+"; this process is no longer watched", slog.String("event", string(EventAlert)))
		}
	}()
}

// logAlert writes an event to the console (text or JSON lines, as Log
// does) and to OnEvent.
func (b *Boot) logAlert(e ebpfmon.Event) error {
	lvl := slog.LevelInfo
	switch e.Severity {
	case ebpfmon.Warning:
		lvl = slog.LevelWarn
	case ebpfmon.Critical:
		lvl = slog.LevelError
	}
	b.log.Log(context.Background(), lvl, "monitor alert: "+e.String(), slog.String("event", string(EventAlert)),
		slog.String("technique", string(e.Technique)), slog.String("severity", string(e.Severity)),
		slog.Int("pid", e.TGID), slog.String("comm", e.Comm), slog.String("exe", e.Exe), slog.Uint64("uid", uint64(e.UID)),
		slog.Int("target_pid", e.TargetPID), slog.Bool("overlap", e.Overlap), slog.Int64("result", e.Result),
		slog.String("mode", string(e.Mode)), slog.Bool("denied", e.Denied))
	if b.cfg.OnEvent != nil {
		ev := e
		b.cfg.OnEvent(Event{Kind: EventAlert, Message: e.String(), Alert: &ev})
	}
	return nil
}

// stopMonitor ends protection and delivers what is queued: the dispatcher
// stops, the key-service sink posts what it holds (so the alert that caused
// a lock reaches the service even then), and the monitor closes.
func (b *Boot) stopMonitor() error {
	mon := b.mon
	if mon == nil {
		return nil
	}
	var err error
	mon.once.Do(func() {
		mon.cancel()
		<-mon.done
		close(mon.quit)
		// The queued alerts go out first: detaching the programs takes a
		// while (hundreds of ms), and the key service should not wait for it.
		if mon.sink != nil {
			mon.sink.Close()
			if d, f := mon.sink.Dropped(), mon.sink.Failed(); d+f > 0 {
				b.log.Warn(fmt.Sprintf("monitor: %d alerts were not delivered to the key service (%d dropped on a full queue, %d refused or unreachable); the console log has them all", d+f, d, f), slog.String("event", string(EventAlert)))
			}
		}
		if st, serr := mon.m.Stats(); serr == nil && st.Drops > 0 {
			b.log.Warn(fmt.Sprintf("monitor: the kernel dropped %d events (ring buffer full)", st.Drops), slog.String("event", string(EventAlert)))
		}
		err = mon.m.Close()
	})
	return err
}

// eventPoster posts monitor alerts to /v1/events under the boot's session.
// The answer carries the session state like a heartbeat's, so a revoke
// seen here locks at once.
type eventPoster struct{ b *Boot }

func (p eventPoster) PostEvents(ctx context.Context, evs []api.Event) error {
	select {
	case <-p.b.mon.session: // first, so that a stopping monitor still flushes
	default:
		select {
		case <-p.b.mon.session:
		case <-p.b.mon.quit:
			return errors.New("the boot ended before the key service gave a session to post alerts under")
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	resp, err := p.b.cl.Events(ctx, api.EventsRequest{Session: p.b.session, Events: evs})
	if err != nil {
		p.b.log.Warn("monitor: posting alerts to the key service failed: "+err.Error(), slog.String("event", string(EventAlert)))
		return err
	}
	if resp.State == api.StateRevoked {
		// While Run is still setting up, the heartbeat it starts will
		// see the revoke; only a serving boot can be locked from here.
		mon := p.b.mon
		mon.mu.Lock()
		if mon.serving {
			go p.b.lock(ErrRevoked)
		}
		mon.mu.Unlock()
	}
	return nil
}

// monitorSession lets queued alerts be posted: the session exists.
func (b *Boot) monitorSession() {
	if b.mon != nil {
		close(b.mon.session)
	}
}

// monitorServing is the end of Run: from here an alert may lock, and one
// that came during the unlock does now.
func (b *Boot) monitorServing() {
	if b.mon == nil {
		return
	}
	b.mon.mu.Lock()
	defer b.mon.mu.Unlock()
	b.mon.serving = true
	if p := b.mon.pending; p != nil {
		go b.lock(p)
	}
}
