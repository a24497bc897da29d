package keysvc

import (
	"context"
	"crypto/x509"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"time"

	"github.com/keygate/keygate/keysvc/alert"
	"github.com/keygate/keygate/keysvc/api"
	"github.com/keygate/keygate/keysvc/store"
)

// AlertConfig says where a Service delivers alerts (package keysvc/alert):
// each stored VM event at or above MinSeverity goes to every webhook and
// syslog target, at least once.
type AlertConfig struct {
	Webhooks      []string // URLs
	WebhookSecret []byte   // HMAC key of X-Keygate-Signature (required with Webhooks)
	Syslog        []string // tcp://HOST:PORT or tls://HOST:PORT
	// CAs, if not nil, are what HTTPS webhooks and TLS syslog servers are
	// checked against (the system's roots otherwise).
	CAs           *x509.CertPool
	MinSeverity   string        // "warning" if empty
	DeadLetterAge time.Duration // alert.DefaultDeadLetterAge if zero
}

func (c AlertConfig) empty() bool { return len(c.Webhooks) == 0 && len(c.Syslog) == 0 }

// alertSinks makes the sinks c names; Start calls it before it touches the
// data directory, so that a mistyped target changes nothing.
func alertSinks(c AlertConfig) ([]alert.Sink, error) {
	var sinks []alert.Sink
	for i, u := range c.Webhooks {
		w, err := alert.NewWebhook(i+1, u, c.WebhookSecret, c.CAs)
		if err != nil {
			return nil, err
		}
		sinks = append(sinks, w)
	}
	for i, a := range c.Syslog {
		s, err := alert.NewSyslog(i+1, a, c.CAs)
		if err != nil {
			return nil, err
		}
		sinks = append(sinks, s)
	}
	return sinks, nil
}

// Alerter queues alerts durably; *alert.Dispatcher implements it.
type Alerter interface {
	Wants(severity string) bool
	Enqueue(ctx context.Context, alerts []alert.Alert) error
}

// WithAlerts has every stored event that a wants queued for delivery
// before the VM is answered (a failure answers 500, and the VM sends the
// batch again).
func WithAlerts(a Alerter) Option { return func(s *Server) { s.alerts = a } }

// AlertBody is the JSON document each alert sink receives.
type AlertBody struct {
	Type           string          `json:"type"` // "keygate.alert"
	IdempotencyKey string          `json:"idempotency_key"`
	Event          api.EventRecord `json:"event"`
}

// alertKey is an alert's idempotency key: a MAC of its event ID under the
// session key, so that it differs between key services whose event IDs
// might collide. It is made once, when the alert is queued, and stored with
// it: every retry, by any replica, sends the same key.
func (s *Server) alertKey(eventID int64) string {
	b := binary.BigEndian.AppendUint64([]byte("keygate alert idempotency v1"), uint64(eventID))
	return "kg-" + hex.EncodeToString(s.mac(b)[:16])
}

// queueAlerts queues the stored events that are alerts.
func (s *Server) queueAlerts(ctx context.Context, stored []store.VMEvent) error {
	if s.alerts == nil {
		return nil
	}
	var out []alert.Alert
	for _, ev := range stored {
		if !s.alerts.Wants(ev.Severity) {
			continue
		}
		key := s.alertKey(ev.ID)
		body, err := json.Marshal(AlertBody{Type: "keygate.alert", IdempotencyKey: key, Event: eventRecord(ev)})
		if err != nil {
			return fmt.Errorf("encode alert: %w", err)
		}
		out = append(out, alert.Alert{EventID: ev.ID, Key: key, Severity: ev.Severity, Kind: ev.Kind, Body: body})
	}
	if len(out) == 0 {
		return nil
	}
	return s.alerts.Enqueue(ctx, out)
}
