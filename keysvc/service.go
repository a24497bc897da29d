package keysvc

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/keygate/keygate/keysvc/alert"
	"github.com/keygate/keygate/keysvc/audit"
	"github.com/keygate/keygate/keysvc/masterkey"
	"github.com/keygate/keygate/keysvc/masterkey/hsm"
	"github.com/keygate/keygate/keysvc/store"
)

// Config says where a Service keeps its data and listens.
type Config struct {
	DataDir     string   // required
	Listen      string   // VM API; DefaultListen if empty
	AdminListen string   // admin API and /metrics; DefaultAdminListen if empty
	Hostnames   []string // extra names for the server certificate
	// DB is the database: "" or "sqlite" for DataDir/keysvc.db, or a
	// PostgreSQL URL as libpq takes it (several replicas share one).
	DB string
	// PKCS11, if set, keeps the master key in that token instead of
	// DataDir/master.key (package keysvc/masterkey/hsm).
	PKCS11 *hsm.Config
	Logger *slog.Logger
	// Alerts says where alerts are delivered (none if empty).
	Alerts AlertConfig
	// AdminClientCAs, if set, makes the admin listener ask for a client
	// certificate: one that chains to these CAs (with the client-auth
	// usage) authenticates like the admin token, on the API and for the
	// dashboard's login.
	AdminClientCAs *x509.CertPool
	// Options are appended to the Server's (for tests: a clock, a TTL).
	Options []Option
}

// Default listen addresses.
const (
	DefaultListen      = "127.0.0.1:8443"
	DefaultAdminListen = "127.0.0.1:8444"
)

// Service is a running key service: a Server over a data directory, served
// on two TLS 1.3 listeners.
type Service struct {
	Data *DataDir
	// Server is nil until the service has reached its database: at once
	// from Start, or later when Start found it unavailable (Connected).
	Server    *Server
	vmLn      net.Listener
	adminLn   net.Listener
	servers   []*http.Server
	st        store.Backend
	dbMon     *dbMonitor
	auditLog  *audit.Log
	mk        masterkey.Master
	src       keySource
	keys      []MasterKey // every master key loaded, wiped on release
	errs      chan error
	closeOnce sync.Once
	log       *slog.Logger
	stopPurge context.CancelFunc
	purged    sync.WaitGroup
	// live is held shared by every request in a handler and exclusively by
	// release, so that the store is never closed nor the keys wiped under a
	// running handler; released makes later requests answer 503.
	live     sync.RWMutex
	released bool
	// alert delivery (alerts.go), stopped before the store closes
	alerts     *alert.Dispatcher
	sinks      []alert.Sink
	stopAlerts context.CancelFunc
	alerted    sync.WaitGroup
	// the listeners' handlers: notConnected until serve installs the
	// Server's (VM API, admin API)
	handlers [2]atomic.Pointer[http.Handler]
	// connect's goroutine, when Start found the database unavailable:
	// stopConnect ends it, connecting is closed when it has returned, and
	// connected when the service serves on its store.
	stopConnect context.CancelFunc
	connecting  chan struct{}
	connected   chan struct{}
}

// track runs h under s.live, refusing requests once the service released
// its store and keys.
func (s *Service) track(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		s.live.RLock()
		defer s.live.RUnlock()
		if s.released {
			writeError(w, errorf(http.StatusServiceUnavailable, "the key service is stopping; retry against a running one", "shutting down"))
			return
		}
		h.ServeHTTP(w, r)
	})
}

// purgeEvery is how often used challenge IDs past their expiry are dropped.
const purgeEvery = time.Minute

// purge drops expired used-challenge records until ctx ends (an expired
// challenge is refused by its expiry alone, so its record is no longer
// needed), and stored VM events past their retention.
func (s *Service) purge(ctx context.Context) {
	defer s.purged.Done()
	// A replica that starts checks the stored locks against the audit
	// chain at once, not a minute later (reattest.go).
	if _, err := s.Server.checkLocks(ctx); err != nil && ctx.Err() == nil {
		s.log.Warn("check session locks", slog.Any("err", err))
	}
	t := time.NewTicker(purgeEvery)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C: // with the clock challenges are checked with
			if s.dbMon != nil && s.dbMon.down.Load() {
				continue // the outage is logged once, by the monitor
			}
			s.Server.FlushAudit(ctx)
			s.Server.CheckStale(ctx)
			if n, err := s.st.PurgeChallenges(ctx, s.Server.now().Add(-challengeGrace)); err != nil && ctx.Err() == nil {
				s.log.Warn("purge used challenges", slog.Any("err", err))
			} else if n > 0 {
				s.log.Debug("purged used challenges", slog.Int64("count", n))
			}
			if n, err := s.st.PurgeEvents(ctx, s.Server.now().Add(-s.Server.eventsKept)); err != nil && ctx.Err() == nil {
				s.log.Warn("purge old vm events", slog.Any("err", err))
			} else if n > 0 {
				s.log.Info("purged vm events past retention", slog.Int64("count", n), slog.Duration("retention", s.Server.eventsKept))
			}
		}
	}
}

// Start bootstraps cfg.DataDir (master key, CA, server certificate, admin
// token), opens the store and the audit chain, and starts serving. Stop it
// with Shutdown.
//
// A PostgreSQL database that cannot be reached does not stop it: Start
// then returns a Service that listens, answers /healthz, reports not ready
// on /readyz and answers everything else 503 with Retry-After, and that
// connects by itself when the database answers (see connect; Connected
// says when). An error found then (a master key the database does not
// record, a newer schema) is delivered on Err.
func Start(ctx context.Context, cfg Config) (_ *Service, err error) {
	if cfg.DataDir == "" {
		return nil, errors.New("start key service: no data directory (use --data DIR)")
	}
	if cfg.DB != "" && cfg.DB != "sqlite" && !store.IsPostgresURL(cfg.DB) {
		// Not echoed: a libpq key=value string can carry a password.
		return nil, errors.New("start key service: --db is neither sqlite nor a postgres:// or postgresql:// URL: use sqlite (DIR/keysvc.db) or postgres://user@host/dbname (the password in ~/.pgpass or PGPASSFILE, not on the command line)")
	}
	log := cfg.Logger
	if log == nil {
		log = slog.Default()
	}
	svc := &Service{log: log, errs: make(chan error, 2), connected: make(chan struct{})}
	defer func() {
		if err != nil {
			svc.release()
		}
	}()
	if svc.sinks, err = alertSinks(cfg.Alerts); err != nil {
		return nil, fmt.Errorf("start key service: %w", err)
	}
	svc.Data, err = Bootstrap(cfg.DataDir, cfg.Hostnames, time.Now())
	if err != nil {
		return nil, fmt.Errorf("start key service: %w", err)
	}
	if svc.src, err = openKeySource(cfg); err != nil {
		return nil, fmt.Errorf("start key service: master key: %w", err)
	}
	// The master key before the store: one sealed to a TPM is unsealed
	// only while Start runs, and the store may open only later.
	mk, created, err := svc.src.load()
	if err != nil {
		return nil, fmt.Errorf("start key service: master key: %w", err)
	}
	svc.keys = append(svc.keys, mk)
	if created {
		if cfg.PKCS11 != nil {
			svc.Data.Created = append(svc.Data.Created, "pkcs11:"+cfg.PKCS11.URI.Object)
		} else {
			svc.Data.Created = append(svc.Data.Created, MasterKeyFile)
		}
	}
	st, err := store.Open(ctx, cfg.DB, cfg.DataDir)
	if err != nil && store.IsPostgresURL(cfg.DB) && errors.Is(err, store.ErrUnavailable) {
		if err := svc.listen(cfg); err != nil {
			return nil, fmt.Errorf("start key service: %w", err)
		}
		log.Error("database unavailable at start: serving /healthz, answering /readyz and every request 503 until it answers", slog.Any("err", err))
		cctx, stop := context.WithCancel(context.Background())
		svc.stopConnect, svc.connecting = stop, make(chan struct{})
		go svc.connect(cctx, cfg, mk, time.Now())
		svc.logServing(cfg)
		return svc, nil
	}
	if err != nil {
		return nil, fmt.Errorf("start key service: %w", err)
	}
	if err := svc.open(ctx, cfg, st, mk); err != nil {
		return nil, fmt.Errorf("start key service: %w", err)
	}
	if err := svc.listen(cfg); err != nil {
		return nil, fmt.Errorf("start key service: %w", err)
	}
	svc.serve()
	svc.logServing(cfg)
	return svc, nil
}

// open does the rest of Start's work once the store is open: the
// master-key check against the database, the audit chain, the Server, and
// a rotation under way. On an error the caller releases what it set.
func (svc *Service) open(ctx context.Context, cfg Config, st store.Backend, mk masterkey.Master) (err error) {
	svc.st = st
	lk := loadedKeys{cur: mk}
	err = lk.loadRotationKeys(ctx, svc.src, svc.st)
	svc.keys = append(svc.keys, lk.next)
	if err != nil {
		return fmt.Errorf("master key: %w", err)
	}
	svc.mk = lk.cur
	if err := checkMasterKey(ctx, svc.st, svc.mk); err != nil {
		return err
	}
	if svc.auditLog, err = audit.New(svc.st, svc.mk); err != nil {
		return err
	}
	// With the master key in hand (trusted at this point), authenticate a
	// store that is not yet, or check its anchor (adopt.go).
	if err := adopt(ctx, svc.st, svc.auditLog, lk.anchorKey(), time.Now(), svc.log); err != nil {
		return err
	}
	opts := append([]Option{WithStore(svc.st), WithAudit(svc.auditLog), WithMasterKey(svc.mk),
		WithAdminToken(svc.Data.adminToken), WithLogger(svc.log), WithCA(svc.Data.caSum)}, cfg.Options...)
	if lk.next != nil {
		opts = append(opts, withSessionKeyAlso(lk.next))
	}
	if cfg.AdminClientCAs != nil {
		opts = append(opts, WithAdminClientCAs(cfg.AdminClientCAs))
	}
	if !cfg.Alerts.empty() {
		if svc.alerts, err = alert.NewDispatcher(svc.st, alert.Config{Sinks: svc.sinks, MinSeverity: cfg.Alerts.MinSeverity,
			DeadLetterAge: cfg.Alerts.DeadLetterAge, Log: svc.log}); err != nil {
			return err
		}
		opts = append(opts, WithAlerts(svc.alerts))
	}
	if svc.Server, err = New(opts...); err != nil {
		return err
	}
	if err := svc.resumeRotation(ctx, lk); err != nil {
		return fmt.Errorf("master-key rotation: %w", err)
	}
	svc.dbMon = newDBMonitor(svc.st, svc.Server, svc.log, svc.Server.metrics.reg)
	return nil
}

// listen opens both listeners and serves them, with the handlers serve
// installs; until then every request but /healthz is answered 503.
func (svc *Service) listen(cfg Config) (err error) {
	listen, adminListen := cfg.Listen, cfg.AdminListen
	if listen == "" {
		listen = DefaultListen
	}
	if adminListen == "" {
		adminListen = DefaultAdminListen
	}
	if svc.vmLn, err = net.Listen("tcp", listen); err != nil {
		return fmt.Errorf("VM API: %w (pick another --listen)", err)
	}
	if svc.adminLn, err = net.Listen("tcp", adminListen); err != nil {
		return fmt.Errorf("admin API: %w (pick another --admin-listen)", err)
	}
	errLog := slog.NewLogLogger(svc.log.Handler(), slog.LevelWarn)
	for i, x := range []struct {
		ln net.Listener
		tc *tls.Config
	}{{svc.vmLn, svc.Data.TLSConfig()}, {svc.adminLn, adminTLS(svc.Data, cfg.AdminClientCAs)}} {
		h := &svc.handlers[i]
		h.Store(&notConnected)
		hs := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { (*h.Load()).ServeHTTP(w, r) }),
			TLSConfig: x.tc, ErrorLog: errLog,
			ReadHeaderTimeout: 10 * time.Second, ReadTimeout: 30 * time.Second, WriteTimeout: 30 * time.Second,
			IdleTimeout: 2 * time.Minute, MaxHeaderBytes: 16 << 10}
		svc.servers = append(svc.servers, hs)
		go func(ln net.Listener) {
			if err := hs.ServeTLS(ln, "", ""); err != nil && !errors.Is(err, http.ErrServerClosed) {
				svc.errs <- err
			}
		}(x.ln)
	}
	return nil
}

// serve installs the Server's handlers on the listeners and starts the
// background work (alert delivery, purges): the service is connected.
func (svc *Service) serve() {
	vm := svc.dbMon.gate(svc.track(svc.Server.VMHandler()), true)
	admin := svc.dbMon.gate(svc.track(svc.Server.AdminHandler()), false)
	svc.handlers[0].Store(&vm)
	svc.handlers[1].Store(&admin)
	if svc.alerts != nil {
		actx, stop := context.WithCancel(context.Background())
		svc.stopAlerts = stop
		svc.alerted.Add(1)
		go func() { defer svc.alerted.Done(); svc.alerts.Run(actx) }()
	}
	purgeCtx, stopPurge := context.WithCancel(context.Background())
	svc.stopPurge = stopPurge
	svc.purged.Add(1)
	go svc.purge(purgeCtx)
	close(svc.connected)
}

func (svc *Service) logServing(cfg Config) {
	svc.log.Info("keysvc serving", slog.String("vm_api", "https://"+svc.vmLn.Addr().String()),
		slog.String("admin_api", "https://"+svc.adminLn.Addr().String()), slog.String("data", cfg.DataDir),
		slog.String("ca", svc.Data.Path(CAFile)), slog.String("ca_sha256", svc.Data.CAFingerprint),
		slog.String("admin_token_file", svc.Data.Path(AdminTokenFile)))
}

// adminTLS is the admin listener's TLS: the VM API's, asking for a client
// certificate when admin client CAs are set (a certificate is optional:
// the token works without one; one that does not chain is refused in the
// handshake).
func adminTLS(d *DataDir, cas *x509.CertPool) *tls.Config {
	c := d.TLSConfig()
	if cas != nil {
		c.ClientCAs, c.ClientAuth = cas, tls.VerifyClientCertIfGiven
	}
	return c
}

// VMAddr is the VM API's listening address.
func (s *Service) VMAddr() string { return s.vmLn.Addr().String() }

// AdminAddr is the admin API's listening address.
func (s *Service) AdminAddr() string { return s.adminLn.Addr().String() }

// Err delivers a listener's failure while serving.
func (s *Service) Err() <-chan error { return s.errs }

// Shutdown stops accepting connections, waits for requests in flight until
// ctx ends, writes pending audit summaries, and closes the store and wipes
// the keys. If ctx ends first, it returns an error at once, and the
// requests still running are left to finish (the servers' read and write
// timeouts bound them): the store is closed and the keys wiped when the last
// of them has returned, in the background, never under it.
func (s *Service) Shutdown(ctx context.Context) error {
	s.stopConnecting()
	var errs []error
	if s.Server != nil {
		s.Server.StopStreams()
	}
	for _, hs := range s.servers {
		if err := hs.Shutdown(ctx); err != nil {
			errs = append(errs, err)
		}
	}
	if len(errs) > 0 {
		go s.release()
		return fmt.Errorf("requests still running after the deadline (the store is closed when they end): %w", errors.Join(errs...))
	}
	s.release()
	return nil
}

// release closes the listeners and the store and wipes the keys, once,
// after every running handler has returned.
func (s *Service) release() {
	s.closeOnce.Do(func() {
		s.stopConnecting()
		s.live.Lock()
		defer s.live.Unlock()
		s.released = true
		if s.stopPurge != nil {
			s.stopPurge()
			s.purged.Wait()
		}
		if s.stopAlerts != nil {
			s.stopAlerts()
			s.alerted.Wait()
		}
		if s.alerts != nil {
			s.alerts.Close()
		}
		if s.dbMon != nil {
			s.dbMon.close()
		}
		for _, ln := range []net.Listener{s.vmLn, s.adminLn} {
			if ln != nil {
				ln.Close()
			}
		}
		if s.Server != nil && s.Server.rot != nil {
			s.Server.rot.cancel()
			s.Server.waitRotation()
		}
		if s.Server != nil {
			s.Server.FlushAudit(context.Background())
			s.Server.wipeSessionKeys()
			s.Server.rows.destroy()
		}
		if s.auditLog != nil {
			s.auditLog.Destroy()
		}
		if s.st != nil {
			s.st.Close()
		}
		if s.Server != nil {
			ks := s.Server.rows.load()
			s.keys = append(s.keys, ks.cur, ks.prev)
		}
		for _, k := range s.keys {
			if d, ok := k.(interface{ Destroy() }); ok && k != nil {
				d.Destroy()
			}
		}
		if s.src != nil {
			s.src.close()
		}
	})
}
