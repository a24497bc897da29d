package ebpfmon

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"sync"

	"github.com/prometheus/client_golang/prometheus"
)

// Sink receives events. Write is called from one goroutine (Dispatch's); a
// sink that blocks delays the others, and in the end fills the kernel's ring
// buffer, where drops are counted.
type Sink interface {
	Write(Event) error
}

// SinkFunc adapts a function to Sink.
type SinkFunc func(Event) error

func (f SinkFunc) Write(e Event) error { return f(e) }

// Dispatch hands each event from events to every sink until events closes
// or ctx ends. A sink's error does not stop the others; onErr (which may be
// nil) hears of it.
func Dispatch(ctx context.Context, events <-chan Event, onErr func(Sink, error), sinks ...Sink) {
	for {
		select {
		case <-ctx.Done():
			return
		case e, ok := <-events:
			if !ok {
				return
			}
			for _, s := range sinks {
				if err := s.Write(e); err != nil && onErr != nil {
					onErr(s, err)
				}
			}
		}
	}
}

// JSONSink writes each event as one line of JSON.
type JSONSink struct {
	mu  sync.Mutex
	enc *json.Encoder
}

// NewJSONSink writes JSON lines to w.
func NewJSONSink(w io.Writer) *JSONSink { return &JSONSink{enc: json.NewEncoder(w)} }

func (s *JSONSink) Write(e Event) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.enc.Encode(e); err != nil {
		return fmt.Errorf("write event as JSON: %v", err)
	}
	return nil
}

// Metrics counts events by technique and severity, and exposes the kernel's
// drop counter and the reader's error counters, for Prometheus.
type Metrics struct {
	events *prometheus.CounterVec // events written, when no Monitor counts them
	m      *Monitor
}

var eventsDesc = prometheus.NewDesc("keygate_monitor_events_total",
	"Attempts to reach a protected process's memory, by technique and severity.", []string{"technique", "severity"}, nil)

// monitorEvents exports a Monitor's own counts: every event it decoded,
// those below its MinSeverity included, which Events never delivers.
type monitorEvents struct{ m *Monitor }

func (c monitorEvents) Describe(ch chan<- *prometheus.Desc) { ch <- eventsDesc }

func (c monitorEvents) Collect(ch chan<- prometheus.Metric) {
	for _, t := range Techniques() {
		for _, s := range Severities() {
			ch <- prometheus.MustNewConstMetric(eventsDesc, prometheus.CounterValue, float64(c.m.count(t, s)), string(t), string(s))
		}
	}
}

// NewMetrics registers keygate_monitor_events_total{technique,severity}
// with reg. Every technique and severity starts at zero, so that a
// dashboard can tell "none" from "not reported". With a Monitor m, the
// counts are m's own, which include events below its MinSeverity, and
// keygate_monitor_drops_total, keygate_monitor_read_errors_total and
// keygate_monitor_decode_errors_total join them; Write then does nothing.
// Without one, Write counts the events it is given.
func NewMetrics(reg prometheus.Registerer, m *Monitor) (*Metrics, error) {
	mt := &Metrics{m: m}
	var cs []prometheus.Collector
	if m == nil {
		mt.events = prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "keygate_monitor_events_total",
			Help: "Attempts to reach a protected process's memory, by technique and severity.",
		}, []string{"technique", "severity"})
		for _, t := range Techniques() {
			for _, s := range Severities() {
				mt.events.WithLabelValues(string(t), string(s))
			}
		}
		cs = append(cs, mt.events)
	} else {
		stat := func(f func(Stats) uint64) func() float64 {
			return func() float64 {
				st, _ := m.Stats() // the user-space counters are there even when the kernel's is not
				return float64(f(st))
			}
		}
		cs = append(cs, monitorEvents{m},
			prometheus.NewCounterFunc(prometheus.CounterOpts{
				Name: "keygate_monitor_drops_total",
				Help: "Events lost because the kernel's ring buffer was full.",
			}, stat(func(s Stats) uint64 { return s.Drops })),
			prometheus.NewCounterFunc(prometheus.CounterOpts{
				Name: "keygate_monitor_read_errors_total",
				Help: "Failed reads of the kernel's ring buffer; each may have lost events.",
			}, stat(func(s Stats) uint64 { return s.ReadErrors })),
			prometheus.NewCounterFunc(prometheus.CounterOpts{
				Name: "keygate_monitor_decode_errors_total",
				Help: "Ring buffer records that did not decode (stale BPF objects); each was an event lost.",
			}, stat(func(s Stats) uint64 { return s.DecodeErrors })))
	}
	for _, c := range cs {
		if err := reg.Register(c); err != nil {
			return nil, fmt.Errorf("register monitor metrics: %v", err)
		}
	}
	return mt, nil
}

func (mt *Metrics) Write(e Event) error {
	if mt.m != nil {
		return nil // the Monitor counted it as it decoded it
	}
	mt.events.WithLabelValues(string(e.Technique), string(e.Severity)).Inc()
	return nil
}

// OnAlert calls fn once, for the first event at or above min: the hook behind
// `--on-alert lock`, which wipes the keys. Later events pass through.
func OnAlert(min Severity, fn func(Event)) Sink {
	var once sync.Once
	return SinkFunc(func(e Event) error {
		if e.Severity.AtLeast(min) {
			once.Do(func() { fn(e) })
		}
		return nil
	})
}

func rank(s Severity) int {
	switch s {
	case Info:
		return 1
	case Warning:
		return 2
	case Critical:
		return 3
	}
	return 0
}
