package keysvc

import "github.com/prometheus/client_golang/prometheus"

// lifecycleMetrics are the collectors of rotation and re-attestation.
type lifecycleMetrics struct {
	rotations *prometheus.CounterVec
	reattests *prometheus.CounterVec
}

func newLifecycleMetrics(reg *prometheus.Registry) *lifecycleMetrics {
	m := &lifecycleMetrics{
		rotations: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "keysvc_uk_rotations_total", Help: "Unwrap-key rotations of volumes by step (started, completed, cancel-requested, cancelled, completed-despite-cancel).",
		}, []string{"step"}),
		reattests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "keysvc_reattestations_total", Help: "Re-attestations of serving VMs by result (ok, lock).",
		}, []string{"result"}),
	}
	reg.MustRegister(m.rotations, m.reattests)
	return m
}

// registerStale adds the gauge of stale sessions, counted at scrape time.
func (m *lifecycleMetrics) registerStale(reg *prometheus.Registry, count func() float64) {
	reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "keysvc_reattest_stale_sessions",
		Help: "Serving sessions whose re-attestations stopped arriving (flagged by the minutely check), fleet-wide: every replica reports the same count from the store (-1 while the store does not answer).",
	}, count))
}
