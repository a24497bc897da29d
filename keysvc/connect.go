package keysvc

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"strconv"
	"time"

	"github.com/keygate/keygate/keysvc/masterkey"
	"github.com/keygate/keygate/keysvc/store"
)

// A replica started while its PostgreSQL database is unreachable (the
// database host reboots with the fleet, or comes up after the key
// service) does not exit: it serves, not ready, and connects by itself.
// Until then it has no store, so no Server: every request but /healthz
// is answered by notConnected, and connect retries every probeEvery. Once
// the store opens, the steps Start would have taken run then (migrations,
// the master-key check, adoption of the store, a rotation under way), and
// an error among them that is not an outage (the database records another
// master key, its schema is newer) stops the service: it is delivered on
// Err, as `keysvc serve` exits with it.

// notConnected answers while the service has not reached its database:
// /healthz 200 (the process serves), /readyz and every other request 503
// with Retry-After, as during an outage.
var notConnected http.Handler = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
	if r.Method == http.MethodGet && r.URL.Path == "/healthz" {
		healthz(w, r)
		return
	}
	w.Header().Set("Retry-After", strconv.Itoa(retryAfter))
	if r.Method == http.MethodGet && r.URL.Path == "/readyz" {
		writeJSON(w, http.StatusServiceUnavailable, map[string]string{"status": "not ready",
			"error": "the key service has not reached its database yet (its log says why)"})
		return
	}
	writeError(w, errorf(http.StatusServiceUnavailable, "retry shortly, or another replica", "the key service has not reached its database yet"))
})

// Connected is closed once the service serves on its store: when Start
// returns, or later if Start found the database unavailable.
func (s *Service) Connected() <-chan struct{} { return s.connected }

// connect opens the store every probeEvery until it opens, then finishes
// starting the service (open, serve). down is when the outage was first
// seen. It returns when the service serves, when it fails for good (the
// error is sent on Err), or when ctx ends.
func (svc *Service) connect(ctx context.Context, cfg Config, mk masterkey.Master, down time.Time) {
	defer close(svc.connecting)
	t := time.NewTicker(probeEvery)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		st, err := store.Open(ctx, cfg.DB, cfg.DataDir)
		if err == nil {
			err = svc.open(ctx, cfg, st, mk)
			if err != nil && svc.Server == nil {
				// Nothing serves on this attempt yet: undo it, and try
				// again if the database went away meanwhile.
				svc.undoOpen()
			}
		}
		if ctx.Err() != nil {
			return // shutting down: release cleans up
		}
		if err != nil && errors.Is(err, store.ErrUnavailable) && svc.Server == nil {
			continue
		}
		if err != nil {
			err = fmt.Errorf("start key service: %w", err)
			svc.log.Error("the key service stops: its database answered, but it cannot serve on it", slog.Any("err", err))
			select {
			case svc.errs <- err:
			default:
			}
			return
		}
		svc.serve()
		svc.log.Info("database available: serving", slog.Duration("waited", time.Since(down).Round(time.Millisecond)))
		return
	}
}

// undoOpen closes what a failed open set before the Server was made, so
// that connect can try again.
func (svc *Service) undoOpen() {
	if svc.alerts != nil {
		svc.alerts.Close()
		svc.alerts = nil
	}
	if svc.auditLog != nil {
		svc.auditLog.Destroy()
		svc.auditLog = nil
	}
	if svc.st != nil {
		svc.st.Close()
		svc.st = nil
	}
}

// stopConnecting ends connect's goroutine, if any, and waits for it: the
// service's fields are then no longer written.
func (s *Service) stopConnecting() {
	if s.stopConnect != nil {
		s.stopConnect()
		<-s.connecting
	}
}
