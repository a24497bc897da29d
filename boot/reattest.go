package boot

import (
	"context"
	"errors"
	"fmt"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/keygate/keygate/keysvc/api"
)

// DefaultReattest is keygate boot's --reattest default.
const DefaultReattest = 5 * time.Minute

// MaxReattest is the longest period the key service accepts: a longer one
// would let a tampered VM stay unflagged for hours.
const MaxReattest = time.Hour

// ErrReattest is what Wait returns once a re-attestation while serving
// failed the key service's policy (a PCR changed after the unlock) and the
// volume was locked. The error that wraps it names the PCRs.
var ErrReattest = errors.New("re-attestation failed the key service's policy; keys wiped and volume closed")

// reattest quotes the PCRs over the session every Reattest (docs/protocol.md,
// "Re-attestation"). "lock" locks the volume as a revoke does; an
// unreachable service or a refused request is an outage, as for the
// heartbeat: the key is here already, and the service flags the session
// stale if it stops hearing from it.
func (b *Boot) reattest(ctx context.Context, volume string) {
	defer close(b.raDone)
	t := time.NewTicker(b.cfg.Reattest)
	defer t.Stop()
	failing := false
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		rctx, cancel := context.WithTimeout(ctx, max(b.cfg.Reattest, 30*time.Second))
		resp, err := b.reattestOnce(rctx)
		cancel()
		if ctx.Err() != nil {
			return
		}
		var r *Refusal
		switch {
		case err == nil && resp.State == api.StateLock:
			why := fmt.Errorf("%w: %s", ErrReattest, denialText(resp))
			go b.lock(why)
			return
		case err == nil && resp.State == api.StateRevoked, errors.As(err, &r) && r.Reason == api.ReasonRevoked:
			go b.lock(ErrRevoked)
			return
		case err != nil:
			if !failing {
				b.emit(Event{Kind: EventOutage, Err: err, Message: fmt.Sprintf("re-attestation failed (%v); the volume stays unlocked and tries again every %s", err, b.cfg.Reattest)})
			}
			failing = true
		default:
			if failing {
				b.emit(Event{Kind: EventReconnected, Message: "re-attestation answers again"})
			}
			failing = false
			b.emit(Event{Kind: EventReattested, Message: fmt.Sprintf("volume %s: re-attestation passed", volume)})
		}
	}
}

func (b *Boot) reattestOnce(ctx context.Context) (*api.ReattestResponse, error) {
	ch, err := b.cl.ReattestChallenge(ctx, b.session)
	if err != nil {
		return nil, err
	}
	raw, err := b.quote(api.QuoteData(ch.Nonce, b.cl.CASHA256()))
	if err != nil {
		return nil, err
	}
	return b.cl.Reattest(ctx, b.session, api.ReattestRequest{Challenge: ch.Challenge, Attestation: raw,
		IntervalSeconds: int64(max(b.cfg.Reattest, time.Second) / time.Second)})
}

// quote is the TPM's attestation over nonce, as the wire carries it.
func (b *Boot) quote(nonce []byte) ([]byte, error) {
	att, err := b.tpm.Attest(nonce, b.cfg.Alg)
	if err != nil {
		return nil, fmt.Errorf("quote PCRs: %w", err)
	}
	return proto.Marshal(att)
}

// denialText names the PCRs the service found changed.
func denialText(resp *api.ReattestResponse) string {
	if resp.Denial == nil {
		return "no details"
	}
	return resp.Denial.Error()
}
