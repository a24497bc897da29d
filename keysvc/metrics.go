package keysvc

import (
	"net/http"
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// metrics are the Server's Prometheus collectors, on a registry of its own
// (so that several Servers in one process, as in tests, do not collide).
type metrics struct {
	reg      *prometheus.Registry
	all      []prometheus.Collector // every collector registered (register)
	requests *prometheus.CounterVec
	latency  *prometheus.HistogramVec
	unlocks  prometheus.Counter
	denials  *prometheus.CounterVec
	events   *prometheus.CounterVec
	// rotationRows counts the rows the running master-key rotation has
	// re-keyed (masterkey_rotate.go).
	rotationRows prometheus.Gauge
	streams      prometheus.Gauge
}

func newMetrics() *metrics {
	m := &metrics{
		reg: prometheus.NewRegistry(),
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "keysvc_requests_total", Help: "HTTP requests by API, route and status code.",
		}, []string{"api", "route", "code"}),
		latency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "keysvc_request_duration_seconds", Help: "HTTP request latency by API and route.",
			Buckets: []float64{.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5},
		}, []string{"api", "route"}),
		unlocks: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "keysvc_unlocks_total", Help: "Unwrap keys released to attested VMs.",
		}),
		denials: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "keysvc_denials_total", Help: "Refused challenges and unlocks by reason.",
		}, []string{"reason"}),
		events: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "keysvc_vm_events_total", Help: "Events reported by VMs by severity and kind (kinds other than heartbeat and the monitor's techniques count as \"other\").",
		}, []string{"severity", "kind"}),
		rotationRows: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "keysvc_master_key_rotation_rows", Help: "Rows (VMs and volumes) the master-key rotation under way has re-sealed and re-MAC'd so far.",
		}),
		streams: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "keysvc_event_streams", Help: "Open live event streams (GET /v1/admin/events/stream).",
		}),
	}
	m.register(m.requests, m.latency, m.unlocks, m.denials, m.events, m.rotationRows, m.streams,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

// register adds collectors to the registry, and keeps them so that a test
// can list every metric name (docs/grafana-dashboard.json must name only
// those).
func (m *metrics) register(cs ...prometheus.Collector) {
	m.reg.MustRegister(cs...)
	m.all = append(m.all, cs...)
}

func (m *metrics) observe(api, route string, code int, d time.Duration) {
	m.requests.WithLabelValues(api, route, strconv.Itoa(code)).Inc()
	m.latency.WithLabelValues(api, route).Observe(d.Seconds())
}

func (m *metrics) handler() http.Handler {
	return promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{})
}
