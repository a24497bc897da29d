package boot

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/keygate/keygate/keysvc/api"
)

// heartbeat posts a heartbeat event every Poll and locks the volume when
// the answer's session state is revoked. An unreachable service is an
// outage: logged once, when it starts and when it ends, never a reason to
// lock (the key is already here; locking on a network blip would turn any
// outage of the key service into an outage of every VM).
func (b *Boot) heartbeat(ctx context.Context) {
	defer close(b.hbDone)
	t := time.NewTicker(b.cfg.Poll)
	defer t.Stop()
	var outageSince time.Time
	for {
		select {
		case <-ctx.Done():
			return
		case err := <-b.serveErr:
			if err != nil {
				b.lock(fmt.Errorf("serving the volume failed: %w", err))
				return
			}
			continue
		case <-t.C:
		}
		req := api.EventsRequest{Session: b.session, Events: []api.Event{{Kind: api.KindHeartbeat, Severity: "info"}}}
		rctx, cancel := context.WithTimeout(ctx, max(b.cfg.Poll, 5*time.Second))
		resp, err := b.cl.Events(rctx, req)
		cancel()
		if ctx.Err() != nil {
			return
		}
		if err != nil {
			var ue *UnreachableError
			if outageSince.IsZero() {
				outageSince = time.Now()
				msg := "key service unreachable while serving; the volume stays unlocked and the session is checked again every " + b.cfg.Poll.String()
				if !errors.As(err, &ue) {
					msg = "heartbeat failed; the volume stays unlocked"
				}
				b.emit(Event{Kind: EventOutage, Err: err, Message: fmt.Sprintf("%s: %v", msg, err)})
			}
			continue
		}
		if !outageSince.IsZero() {
			b.emit(Event{Kind: EventReconnected, Message: fmt.Sprintf("key service answers again after %s", time.Since(outageSince).Round(time.Millisecond))})
			outageSince = time.Time{}
		}
		if resp.State == api.StateRevoked {
			go b.lock(ErrRevoked) // lock waits for nothing of ours, but stop() cancels ctx
			return
		}
	}
}
