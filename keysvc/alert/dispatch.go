package alert

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/keygate/keygate/keysvc/store"
)

// Delivery timing.
const (
	// DefaultDeadLetterAge is how long an alert is retried before it becomes
	// a dead letter: three days, so that a receiver down over a weekend
	// still gets it.
	DefaultDeadLetterAge = 3 * 24 * time.Hour
	minBackoff           = time.Second
	maxBackoff           = 5 * time.Minute
	claimLease           = time.Minute // a claimed item is not claimed again before
	claimBatch           = 64
	idlePoll             = time.Second // how often the outbox is read without a wake-up
)

// Sink is where alerts go.
type Sink interface {
	// ID names the sink in the outbox; it must stay the same across
	// restarts and hold no secret ("webhook:<hash of the URL>").
	ID() string
	// Label names it in metrics and logs ("webhook-1").
	Label() string
	// Deliver sends one alert; nil means the receiver has it.
	Deliver(ctx context.Context, a Delivery) error
	Close() error
}

// Delivery is one alert for one sink.
type Delivery struct {
	Key     string // idempotency key
	EventID int64
	Body    []byte // JSON
	Attempt int    // 1 for the first try
	Created time.Time
}

// Alert is what the key service queues: one event, for every sink.
type Alert struct {
	EventID  int64
	Key      string // idempotency key, the same for every sink and retry
	Severity string
	Kind     string
	Body     []byte // JSON
}

// Dispatcher queues alerts in the outbox and delivers them. Make it with
// NewDispatcher, start Run, and stop it by cancelling Run's context.
type Dispatcher struct {
	ob        store.Outbox
	sinks     []Sink
	byID      map[string]Sink
	min       int
	deadAfter time.Duration
	now       func() time.Time
	log       *slog.Logger
	wake      chan struct{}

	deliveries *prometheus.CounterVec
	pending    prometheus.Gauge
	dead       prometheus.Gauge
}

// Config configures a Dispatcher.
type Config struct {
	Sinks         []Sink
	MinSeverity   string        // "warning" if empty
	DeadLetterAge time.Duration // DefaultDeadLetterAge if zero
	Now           func() time.Time
	Log           *slog.Logger
}

// NewDispatcher returns a Dispatcher over ob.
func NewDispatcher(ob store.Outbox, c Config) (*Dispatcher, error) {
	if c.MinSeverity == "" {
		c.MinSeverity = "warning"
	}
	min := store.SeverityRank(c.MinSeverity)
	if min < 0 {
		return nil, fmt.Errorf("alert minimum severity %q is not one of %s", c.MinSeverity, strings.Join(store.Severities, ", "))
	}
	if c.DeadLetterAge <= 0 {
		c.DeadLetterAge = DefaultDeadLetterAge
	}
	if c.Now == nil {
		c.Now = time.Now
	}
	if c.Log == nil {
		c.Log = slog.Default()
	}
	d := &Dispatcher{ob: ob, sinks: c.Sinks, byID: map[string]Sink{}, min: min, deadAfter: c.DeadLetterAge, now: c.Now, log: c.Log,
		wake: make(chan struct{}, 1),
		deliveries: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "keysvc_alert_deliveries_total", Help: "Alert delivery attempts by sink and result (ok, error, dead).",
		}, []string{"sink", "result"}),
		pending: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "keysvc_alert_outbox_pending", Help: "Alerts in the outbox not yet delivered (all sinks, all replicas).",
		}),
		dead: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "keysvc_alert_dead_letters", Help: "Alerts given up on after the dead-letter age (kept in the outbox, never delivered).",
		}),
	}
	for _, s := range c.Sinks {
		if _, dup := d.byID[s.ID()]; dup {
			return nil, fmt.Errorf("alert sink %s is given twice", s.Label())
		}
		d.byID[s.ID()] = s
	}
	return d, nil
}

// Collectors are the Dispatcher's metrics, for the key service's registry.
func (d *Dispatcher) Collectors() []prometheus.Collector {
	return []prometheus.Collector{d.deliveries, d.pending, d.dead}
}

// Wants reports whether an event of this severity is an alert.
func (d *Dispatcher) Wants(severity string) bool {
	return len(d.sinks) > 0 && store.SeverityRank(severity) >= d.min
}

// Enqueue queues alerts for every sink, durably: when it returns nil they
// will be delivered (or counted as dead letters). The caller answers its
// client only then.
func (d *Dispatcher) Enqueue(ctx context.Context, alerts []Alert) error {
	var items []store.OutboxItem
	now := d.now()
	for _, a := range alerts {
		if !d.Wants(a.Severity) {
			continue
		}
		for _, s := range d.sinks {
			items = append(items, store.OutboxItem{Sink: s.ID(), Key: a.Key, EventID: a.EventID, Body: a.Body, Created: now, Next: now})
		}
	}
	if len(items) == 0 {
		return nil
	}
	if err := d.ob.EnqueueAlerts(ctx, items); err != nil {
		return err
	}
	select {
	case d.wake <- struct{}{}:
	default:
	}
	return nil
}

// Run delivers until ctx ends.
func (d *Dispatcher) Run(ctx context.Context) {
	ids := make([]string, 0, len(d.sinks))
	for _, s := range d.sinks {
		ids = append(ids, s.ID())
	}
	t := time.NewTicker(idlePoll)
	defer t.Stop()
	for {
		d.round(ctx, ids)
		select {
		case <-ctx.Done():
			return
		case <-d.wake:
		case <-t.C:
		}
	}
}

// round delivers what is due and refreshes the gauges.
func (d *Dispatcher) round(ctx context.Context, ids []string) {
	for ctx.Err() == nil {
		items, err := d.ob.ClaimAlerts(ctx, ids, d.now(), claimLease, claimBatch)
		if err != nil {
			if ctx.Err() == nil {
				d.log.Warn("alert outbox: claim", slog.Any("err", err))
			}
			return
		}
		for _, it := range items {
			d.deliver(ctx, it)
		}
		if len(items) < claimBatch {
			break
		}
	}
	if st, err := d.ob.OutboxStats(ctx); err == nil {
		d.pending.Set(float64(st.Pending))
		d.dead.Set(float64(st.Dead))
	}
}

func (d *Dispatcher) deliver(ctx context.Context, it store.OutboxItem) {
	s := d.byID[it.Sink]
	dctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	err := s.Deliver(dctx, Delivery{Key: it.Key, EventID: it.EventID, Body: it.Body, Attempt: it.Attempts + 1, Created: it.Created})
	cancel()
	if ctx.Err() != nil && err != nil {
		return // stopping: the lease runs out and the next start tries again
	}
	if err == nil {
		d.deliveries.WithLabelValues(s.Label(), "ok").Inc()
		if err := d.ob.AlertDelivered(ctx, it.ID); err != nil {
			// Delivered but still queued: it is sent again after the lease
			// (the idempotency key lets the receiver tell).
			d.log.Warn("alert outbox: mark delivered", slog.Int64("event_id", it.EventID), slog.Any("err", err))
		}
		return
	}
	now := d.now()
	dead := now.Sub(it.Created) >= d.deadAfter
	next := now.Add(Backoff(it.Attempts + 1))
	result := "error"
	if dead {
		result = "dead"
		d.log.Error("alert given up on: a dead letter", slog.String("sink", s.Label()), slog.Int64("event_id", it.EventID),
			slog.Int("attempts", it.Attempts+1), slog.Duration("dead_letter_age", d.deadAfter), slog.Any("err", err))
	} else {
		d.log.Warn("alert delivery failed; will retry", slog.String("sink", s.Label()), slog.Int64("event_id", it.EventID),
			slog.Int("attempt", it.Attempts+1), slog.Time("next", next), slog.Any("err", err))
	}
	d.deliveries.WithLabelValues(s.Label(), result).Inc()
	if ferr := d.ob.AlertFailed(ctx, it.ID, err.Error(), next, dead); ferr != nil && !errors.Is(ferr, context.Canceled) {
		d.log.Warn("alert outbox: record failure", slog.Int64("event_id", it.EventID), slog.Any("err", ferr))
	}
}

// Backoff is the wait after the n-th failed attempt: 1 s doubling to 5
// minutes, less up to a fifth at random so that replicas and sinks do not
// retry in step.
func Backoff(n int) time.Duration {
	d := maxBackoff
	if n < 20 {
		d = min(minBackoff<<max(n-1, 0), maxBackoff)
	}
	return d - time.Duration(rand.Int64N(int64(d/5)+1))
}

// Close closes the sinks.
func (d *Dispatcher) Close() error {
	var errs []error
	for _, s := range d.sinks {
		errs = append(errs, s.Close())
	}
	return errors.Join(errs...)
}
