package keysvc

import (
	"context"
	"crypto/subtle"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/keygate/keygate/keysvc/masterkey"
	"github.com/keygate/keygate/keysvc/store"
)

// Health and the database's outages: what a load balancer and a VM see of
// a replica whose database is unreachable. A monitor probes the database
// (store.Backend.Ready) every probeEvery; while it fails, every VM API
// request is answered at once with 503 and Retry-After, /readyz says not
// ready, and the outage is logged once when it starts and once when it
// ends. Requests that reach the store anyway (the outage began under them)
// are bounded by vmRequestTimeout and answered 503 the same way
// (unavailable), never a hang past the VM's own timeout.

const (
	// probeEvery is how often the monitor asks the database.
	probeEvery = time.Second
	// probeTimeout bounds one probe.
	probeTimeout = 2 * time.Second
	// vmRequestTimeout bounds a VM API request's work, database calls
	// included: well under the VM client's 30 s response timeout, so that it
	// hears 503 and tries again (or another replica) instead of timing out.
	vmRequestTimeout = 5 * time.Second
	// retryAfter is the Retry-After, in seconds, of a 503 for an outage.
	retryAfter = 2
)

// ErrMasterKeyMismatch is wrapped by Start's error when the database
// records another master key than the one the service was started with.
var ErrMasterKeyMismatch = store.ErrMasterKeyMismatch

// checkMasterKey records mk's fingerprint (masterkey.Fingerprint, which
// tells nothing of the key) in a database that has none and refuses one
// that records another: replicas of one service must share the master key,
// or each would seal and MAC what the others cannot open. While a
// master-key rotation is under way the database records the old key's
// fingerprint until FinishMasterKeyRotation records the new one, and
// replicas hold either: both of the rotation's keys are accepted then.
func checkMasterKey(ctx context.Context, st store.Backend, mk masterkey.Deriver) error {
	fp, err := masterkey.Fingerprint(mk)
	if err != nil {
		return fmt.Errorf("master key check: %w", err)
	}
	stored, err := st.ClaimMasterKey(ctx, []byte(fp))
	if err != nil {
		return err
	}
	if subtle.ConstantTimeCompare(stored, []byte(fp)) == 1 {
		return nil
	}
	rot, err := st.MasterKeyRotation(ctx)
	if err != nil {
		return fmt.Errorf("master key check: %w", err)
	}
	if rot != nil && (fp == rot.OldKey || fp == rot.NewKey) &&
		(string(stored) == rot.OldKey || string(stored) == rot.NewKey) {
		return nil
	}
	return fmt.Errorf("%w (the database records master key %q, this data directory's is %s): start every replica from a copy of the first replica's data directory (master.key or master.key.tpm, ca.pem, ca.key, admin.token), or point --db at this key service's own database",
		store.ErrMasterKeyMismatch, stored, fp)
}

// unavailable answers 503 with Retry-After if err means the database is
// unavailable, and reports whether it did.
func unavailable(w http.ResponseWriter, err error) bool {
	if !errors.Is(err, store.ErrUnavailable) && !errors.Is(err, context.DeadlineExceeded) {
		return false
	}
	w.Header().Set("Retry-After", strconv.Itoa(retryAfter))
	writeError(w, errorf(http.StatusServiceUnavailable, "retry shortly, or another replica", "the key service's database is unavailable"))
	return true
}

// keyFollower is the Server's side of the probe: it follows the master
// key the database records (masterkey_follow.go).
type keyFollower interface {
	followMasterKey(ctx context.Context) string
	staleReason() string
}

// staleAnswer answers 503 for a replica that does not hold the master key
// the database records: a VM asks another replica, an operator reads why.
func staleAnswer(w http.ResponseWriter, reason string) {
	w.Header().Set("Retry-After", strconv.Itoa(retryAfter))
	writeError(w, errorf(http.StatusServiceUnavailable, "retry shortly, or another replica", "%s", reason))
}

// dbMonitor probes the database and remembers whether it answered; each
// probe also has the Server follow the database's master key.
type dbMonitor struct {
	st    store.Backend
	keys  keyFollower
	log   *slog.Logger
	down  atomic.Bool
	mu    sync.Mutex // serialises probes' state changes
	since time.Time  // when the current outage began
	stop  chan struct{}
	done  chan struct{}
}

func newDBMonitor(st store.Backend, keys keyFollower, log *slog.Logger, reg *prometheus.Registry) *dbMonitor {
	m := &dbMonitor{st: st, keys: keys, log: log, stop: make(chan struct{}), done: make(chan struct{})}
	reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "keysvc_database_up", Help: "1 while the database answers and carries this keysvc's migrations, 0 during an outage.",
	}, func() float64 {
		if m.down.Load() {
			return 0
		}
		return 1
	}))
	go m.run()
	return m
}

func (m *dbMonitor) run() {
	defer close(m.done)
	t := time.NewTicker(probeEvery)
	defer t.Stop()
	for {
		select {
		case <-m.stop:
			return
		case <-t.C:
			m.probe()
		}
	}
}

// probe asks the database once and logs a change of state (once per
// outage, not once per failed request).
func (m *dbMonitor) probe() {
	ctx, cancel := context.WithTimeout(context.Background(), probeTimeout)
	err := m.st.Ready(ctx)
	if err == nil && m.keys != nil {
		m.keys.followMasterKey(ctx)
	}
	cancel()
	m.mu.Lock()
	defer m.mu.Unlock()
	switch wasDown := m.down.Load(); {
	case err != nil && !wasDown:
		m.since = time.Now()
		m.down.Store(true)
		m.log.Error("database unavailable: answering VM requests with 503 until it returns", slog.Any("err", err))
	case err == nil && wasDown:
		m.down.Store(false)
		m.log.Info("database available again", slog.Duration("outage", time.Since(m.since).Round(time.Millisecond)))
	}
}

func (m *dbMonitor) close() {
	close(m.stop)
	<-m.done
}

// healthz is liveness: the process serves HTTP.
func healthz(w http.ResponseWriter, _ *http.Request) {
	writeJSON(w, http.StatusOK, map[string]string{"status": "ok"})
}

// readyz is readiness: the database answered the last probe and carries
// every migration. It needs no token, so it names no cause (the database's
// error carries its host and role): the log has it.
func (m *dbMonitor) readyz(w http.ResponseWriter, _ *http.Request) {
	if m.keys != nil && m.keys.staleReason() != "" {
		w.Header().Set("Retry-After", strconv.Itoa(retryAfter))
		writeJSON(w, http.StatusServiceUnavailable, map[string]string{"status": "not ready",
			"error": "this replica does not hold the master key the database records (a rotation at another replica; the key service's log says what to copy)"})
		return
	}
	if m.down.Load() {
		w.Header().Set("Retry-After", strconv.Itoa(retryAfter))
		writeJSON(w, http.StatusServiceUnavailable, map[string]string{"status": "not ready",
			"error": "the database is unavailable or its schema is not this keysvc's (the key service's log says which)"})
		return
	}
	writeJSON(w, http.StatusOK, map[string]string{"status": "ready"})
}

// gate answers every request with 503 while the database is down, bounds
// the others' work by vmRequestTimeout, and serves /healthz and /readyz.
func (m *dbMonitor) gate(h http.Handler, bound bool) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", healthz)
	mux.HandleFunc("GET /readyz", m.readyz)
	mux.Handle("GET /metrics", h) // served through an outage
	mux.Handle("/", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if m.down.Load() {
			unavailable(w, store.ErrUnavailable)
			return
		}
		if m.keys != nil {
			if reason := m.keys.staleReason(); reason != "" {
				staleAnswer(w, reason)
				return
			}
		}
		if bound {
			ctx, cancel := context.WithTimeout(r.Context(), vmRequestTimeout)
			defer cancel()
			r = r.WithContext(ctx)
		}
		h.ServeHTTP(w, r)
	}))
	return mux
}
