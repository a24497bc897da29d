package keysvc

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"crypto/subtle"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"

	"github.com/awnumar/memguard"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/keygate/keygate/attest"
	"github.com/keygate/keygate/keysvc/audit"
	"github.com/keygate/keygate/keysvc/dashboard"
	"github.com/keygate/keygate/keysvc/masterkey"
	"github.com/keygate/keygate/keysvc/store"
)

// Store is what the Server persists: enrolled VMs, volumes with their sealed
// unwrap keys, used challenge IDs, and the events VMs report. keysvc/store's
// SQLite and Postgres implement it.
type Store interface {
	store.VMs
	store.Volumes
	store.Challenges
	store.Events
}

// Auditor appends to and checks the audit chain; *audit.Log implements it.
type Auditor interface {
	Append(ctx context.Context, ev audit.Event) (audit.Record, error)
	AppendUsing(ctx context.Context, use store.ChallengeUse, ev audit.Event) (audit.Record, error)
	Verify(ctx context.Context) (audit.Report, error)
	Scan(ctx context.Context, from uint64, fn func(audit.Record) error) error
}

// MasterKey seals secrets at rest and derives sub-keys;
// *masterkey.Key implements it.
type MasterKey interface {
	Seal(recordID string, plaintext []byte) ([]byte, error)
	Open(recordID string, sealed []byte) (*memguard.LockedBuffer, error)
	Derive(label string) (*memguard.LockedBuffer, error)
}

// challengeGrace is how long a used challenge stays on record past its
// expiry. The service records an unlock's challenge use with its outcome,
// after verifying the quote; a release whose challenge expired more than
// half of this ago is refused, so that the purge can never have removed the
// record of an earlier use of the same challenge.
const challengeGrace = 10 * time.Minute

// Sub-key labels this package derives from the master key (the challenge
// MAC key uses masterkey.LabelChallengeMAC, so that every replica agrees).
const labelSessionMAC = "keygate session mac v1"

// Server serves the VM API and the admin API. Build it with New; it is safe
// for concurrent use.
type Server struct {
	st Store // an *authStore over the store given (rowauth.go)
	// caSum is the SHA-256 of the service CA (DER), which every quote's
	// qualifying data binds (api.QuoteData); zero until WithCA.
	caSum [32]byte
	rows  *keyring // the master key(s) and their row MAC keys (keyring.go)
	audit Auditor
	// initMK and initCh are the master key and challenger New starts
	// from. After New, use rows (seal, open, MACs) and chs: a master-key
	// rotation replaces both, and wipes initMK.
	initMK   MasterKey
	initCh   *attest.Challenger
	chs      atomic.Pointer[challengers]
	sess     atomic.Pointer[sessionKeys]
	rot      *rotator // nil: master-key rotation unavailable (masterkey_rotate.go)
	rotBatch int
	rotHook  func(batch int) error
	// follow serialises followMasterKey; stale says why this replica
	// cannot serve under its master key (masterkey_follow.go).
	follow         sync.Mutex
	stale          staleKey
	followGrace    time.Duration
	followGraceSet bool
	adminToken     [sha256.Size]byte
	hasToken       bool
	now            func() time.Time
	log            *slog.Logger
	metrics        *metrics
	// unlocking counts the unlocks under way: the store's group commit
	// waits for their writes (see New).
	unlocking  atomic.Int64
	learnPCRs  []int
	ttl        time.Duration
	sourceRate float64
	vmRate     float64
	bySource   *limiter
	byAdmin    *limiter
	anonAudit  *auditBudget // unauthenticated admin requests (budget.go)
	vmAudit    *auditBudget // VM API refusals (budget.go)
	auditRate  float64
	byVM       *limiter
	ekRoots    *x509.CertPool
	eventsKept time.Duration
	// faults is WithFaults' injector (rotate.go); nil outside crash tests.
	faults func(step string) error
	// lm: rotation and re-attestation metrics (rotate.go, reattest.go).
	lm *lifecycleMetrics
	// sessions keeps the re-attestation state every replica shares (nil:
	// the store has none, and locks are this replica's alone); locks
	// caches the locks this replica has seen (reattest.go).
	sessions store.ReattestSessions
	locks    *lockCache
	lockScan lockScan
	// sessStored: the session key is the one sealed in the store
	// (sessionkey.go), which master-key rotations re-seal and keep;
	// svcKeys is that store, sessAlso the rotation's new key at start.
	sessStored bool
	svcKeys    store.ServiceKeys
	sessAlso   MasterKey

	// The dashboard (ui.go) and the live event stream (stream.go).
	ui          *dashboard.Dashboard
	uiIndex     auditIndex
	feed        store.EventFeed // nil if the store cannot stream
	bell        bell            // rung when this replica stores events
	streams     context.Context // ended by StopStreams
	stopStreams context.CancelFunc
	adminCAs    *x509.CertPool // admin client certificates (WithAdminClientCAs)
	alerts      Alerter        // nil: no alert delivery (alerts.go)
}

// Option configures a Server.
type Option func(*Server)

// WithCA names the CA that signs the service's certificates by the SHA-256
// of its DER (required): quotes qualify it (api.QuoteData).
func WithCA(sha256 [32]byte) Option { return func(s *Server) { s.caSum = sha256 } }

// WithStore sets the store (required).
func WithStore(st Store) Option { return func(s *Server) { s.st = st } }

// WithAudit sets the audit chain (required).
func WithAudit(a Auditor) Option { return func(s *Server) { s.audit = a } }

// WithMasterKey sets the master key (required): it seals unwrap keys and
// derives the challenge and session MAC keys.
func WithMasterKey(mk MasterKey) Option { return func(s *Server) { s.initMK = mk } }

// MinAdminTokenLen is the shortest admin token New accepts.
const MinAdminTokenLen = 32

// WithAdminToken sets the bearer token the admin API requires (required, at
// least MinAdminTokenLen characters). Only its SHA-256 is kept.
func WithAdminToken(token string) Option {
	return func(s *Server) {
		s.adminToken, s.hasToken = sha256.Sum256([]byte(token)), len(token) >= MinAdminTokenLen
	}
}

// WithAdminClientCAs has admin client certificates that chain to cas
// authenticate the admin API and the dashboard's login like the token
// (Config.AdminClientCAs also makes the listener ask for them).
func WithAdminClientCAs(cas *x509.CertPool) Option { return func(s *Server) { s.adminCAs = cas } }

// WithClock sets the clock for challenges and records (time.Now otherwise).
func WithClock(now func() time.Time) Option { return func(s *Server) { s.now = now } }

// WithLogger sets the structured logger (slog.Default otherwise).
func WithLogger(l *slog.Logger) Option { return func(s *Server) { s.log = l } }

// WithChallengeTTL sets how long a challenge is valid
// (attest.DefaultChallengeTTL otherwise).
func WithChallengeTTL(d time.Duration) Option { return func(s *Server) { s.ttl = d } }

// WithChallenger sets the challenge issuer and checker. By default New makes
// one keyed with the master key's challenge sub-key
// (masterkey.LabelChallengeMAC), so that every replica on one database
// accepts the others' tokens; a Challenger given here must use the same
// clock. The Server records used challenges in its store itself (with the
// record of each attempt, see unlock), so the Challenger's replay cache, if
// it has one, is not consulted.
func WithChallenger(ch *attest.Challenger) Option { return func(s *Server) { s.initCh = ch } }

// DefaultEventRetention is how long stored VM events are kept.
const DefaultEventRetention = 90 * 24 * time.Hour

// WithEventRetention sets how long stored VM events are kept
// (DefaultEventRetention otherwise); a Service purges older ones every
// minute. The warning and critical ones stay in the audit chain for good.
func WithEventRetention(d time.Duration) Option { return func(s *Server) { s.eventsKept = d } }

// WithLearnPCRs sets the PCRs learn mode captures (LearnPCRs otherwise).
func WithLearnPCRs(pcrs []int) Option { return func(s *Server) { s.learnPCRs = pcrs } }

// WindowPCR is the PCR a VM extends right after it imports its key
// (tpm.WindowPCR), so that the same boot cannot unlock again.
const WindowPCR = 15

// LearnPCRs are what learn mode captures by default: the boot chain
// (attest.BootPCRs) and WindowPCR. Learning WindowPCR at its reset value is
// what makes a second unlock in the same boot fail the policy, with
// diagnostics, and not only at the TPM.
var LearnPCRs = append(slices.Clone(attest.BootPCRs), WindowPCR)

// New returns a Server. WithStore, WithAudit, WithMasterKey and
// WithAdminToken are required.
func New(opts ...Option) (*Server, error) {
	s := &Server{now: time.Now, log: slog.Default(), learnPCRs: LearnPCRs, ttl: attest.DefaultChallengeTTL,
		sourceRate: DefaultSourceRate, vmRate: DefaultVMRate, auditRate: DefaultRefusalAuditRate, eventsKept: DefaultEventRetention}
	for _, o := range opts {
		o(s)
	}
	switch {
	case s.st == nil:
		return nil, errors.New("new key service: no store (use WithStore)")
	case s.audit == nil:
		return nil, errors.New("new key service: no audit log (use WithAudit)")
	case s.initMK == nil:
		return nil, errors.New("new key service: no master key (use WithMasterKey)")
	case s.caSum == [32]byte{}:
		return nil, errors.New("new key service: no CA fingerprint, which quotes must name (use WithCA)")
	case s.eventsKept <= 0:
		return nil, fmt.Errorf("new key service: event retention %v is not positive", s.eventsKept)
	case !s.hasToken:
		return nil, fmt.Errorf("new key service: no admin token of at least %d characters (use WithAdminToken)", MinAdminTokenLen)
	}
	if s.initCh == nil {
		chKey, err := s.initMK.Derive(masterkey.LabelChallengeMAC)
		if err != nil {
			return nil, fmt.Errorf("new key service: challenge key: %w", err)
		}
		s.initCh, err = attest.NewChallenger(chKey.Bytes(), attest.WithTTL(s.ttl), attest.WithClock(s.now))
		chKey.Destroy()
		if err != nil {
			return nil, fmt.Errorf("new key service: %w", err)
		}
	}
	if err := s.initSessionKey(); err != nil {
		return nil, fmt.Errorf("new key service: session key: %w", err)
	}
	s.sessions, _ = s.st.(store.ReattestSessions)
	s.chs.Store(&challengers{cur: s.initCh})
	ks, err := newRingKeys(s.initMK)
	if err != nil {
		return nil, fmt.Errorf("new key service: %w", err)
	}
	s.rows = &keyring{}
	s.rows.p.Store(ks)
	s.metrics = newMetrics()
	s.lm, s.locks = newLifecycleMetrics(s.metrics.reg), newLockCache()
	s.lm.registerStale(s.metrics.reg, s.countStale)
	if c, ok := s.alerts.(interface{ Collectors() []prometheus.Collector }); ok {
		s.metrics.register(c.Collectors()...)
	}
	// Each unlock makes one durable write, after verifying its quote: while
	// others are under way, the store holds a commit briefly for theirs, so
	// that under load they share one fsync (store.SetCommitDelay).
	if cd, ok := s.st.(interface {
		SetCommitDelay(time.Duration, func() int)
	}); ok {
		cd.SetCommitDelay(store.DefaultCommitDelay, func() int { return int(s.unlocking.Load()) })
	}
	if f, ok := s.st.(store.EventFeed); ok {
		s.feed = f
	}
	// From here on every VM and volume row is MAC'd on write and checked on
	// read (rowauth.go).
	s.st = &authStore{Store: s.st, k: s.rows}
	s.streams, s.stopStreams = context.WithCancel(context.Background())
	if s.ui, err = dashboard.New(uiBackend{s}, dashboard.Options{Now: s.now, Log: s.log, ClientCAs: s.adminCAs}); err != nil {
		return nil, fmt.Errorf("new key service: dashboard: %w", err)
	}
	s.bySource, s.byVM = newLimiter(s.sourceRate, time.Now), newLimiter(s.vmRate, time.Now)
	s.byAdmin = newLimiter(s.sourceRate, time.Now)
	s.anonAudit = s.newAuditBudget(s.sourceRate, anonSummary)
	s.vmAudit = s.newAuditBudget(s.auditRate, refusalSummary)
	return s, nil
}

// VMHandler returns the handler of the VM API (/v1/challenge, /v1/unlock,
// /v1/provision, /v1/session, /v1/events, /v1/activate[/finish],
// /v1/rotate, /v1/reattest[/challenge]).
func (s *Server) VMHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("POST /v1/challenge", s.handleChallenge)
	mux.HandleFunc("POST /v1/unlock", s.handleUnlock)
	mux.HandleFunc("POST /v1/provision", s.handleProvision)
	mux.HandleFunc("POST /v1/activate", s.handleActivate)
	mux.HandleFunc("POST /v1/activate/finish", s.handleActivateFinish)
	mux.HandleFunc("GET /v1/session", s.handleSession)
	mux.HandleFunc("POST /v1/events", s.handleEvents)
	mux.HandleFunc("POST /v1/rotate", s.handleRotateConfirm)
	mux.HandleFunc("POST /v1/reattest/challenge", s.handleReattestChallenge)
	mux.HandleFunc("POST /v1/reattest", s.handleReattest)
	mux.HandleFunc("/", notFound)
	return s.instrument("vm", limitSource(s.bySource, mux))
}

// AdminHandler returns the handler of the admin API (/v1/admin/…), the
// dashboard (/ui/, package keysvc/dashboard) and /metrics. Every /v1/admin/
// request is authenticated before routing and before the rate limit, and
// audited with its outcome (see requireAdmin); /metrics needs no token; the
// dashboard has its own login.
func (s *Server) AdminHandler() http.Handler {
	mux := http.NewServeMux()
	s.adminRoutes(mux)
	mux.HandleFunc("/", notFound)
	top := http.NewServeMux()
	top.Handle("/v1/admin/", s.requireAdmin(mux))
	top.Handle("GET /metrics", s.metrics.handler())
	top.Handle("/ui/", s.ui)
	top.Handle("GET /{$}", http.RedirectHandler("/ui/", http.StatusSeeOther))
	top.HandleFunc("/", notFound)
	return s.instrument("admin", top)
}

func notFound(w http.ResponseWriter, r *http.Request) {
	writeError(w, errorf(http.StatusNotFound, "see docs/protocol.md for the endpoints", "no endpoint %s %s", r.Method, r.URL.Path))
}

// statusWriter remembers the status code written.
type statusWriter struct {
	http.ResponseWriter
	status int
}

func (w *statusWriter) WriteHeader(code int) {
	if w.status == 0 {
		w.status = code
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *statusWriter) Write(b []byte) (int, error) {
	if w.status == 0 {
		w.status = http.StatusOK
	}
	return w.ResponseWriter.Write(b)
}

// Unwrap lets http.ResponseController reach the connection (the event
// stream flushes and lifts the write deadline).
func (w *statusWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

func (w *statusWriter) code() int {
	if w.status == 0 {
		return http.StatusOK
	}
	return w.status
}

// instrument records metrics and a log line for every request.
func (s *Server) instrument(api string, h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		sw := &statusWriter{ResponseWriter: w}
		h.ServeHTTP(sw, r)
		route := r.Pattern
		if route == "" {
			route = "unmatched"
		}
		d := time.Since(start)
		s.metrics.observe(api, route, sw.code(), d)
		s.log.LogAttrs(r.Context(), slog.LevelInfo, "request", slog.String("api", api),
			slog.String("method", r.Method), slog.String("path", r.URL.Path), slog.Int("status", sw.code()),
			slog.Duration("duration", d), slog.String("remote", remoteHost(r)))
	})
}

// requireAdmin checks the bearer token before anything else, routing and
// rate limiting included.
//
// A request without a valid token is answered 401, never 429, and audited;
// so that a flood of them cannot grow the chain without bound, each source
// address gets its own record for at most the per-source rate, and the
// ones past it are counted and written as one summary record (anonAudit,
// an auditBudget: the VM API's refusals use the same mechanism). An authenticated request is then held to the admin API's
// per-source limit (429) and routed; either way it is audited with its
// status. These outcome records are best-effort (record); a mutating call
// has already appended its action record, fail-closed, before changing
// anything (intend).
func (s *Server) requireAdmin(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		sw := &statusWriter{ResponseWriter: w}
		remote := remoteHost(r)
		path := auditPath(r.URL.Path)
		client := "admin-token"
		ok := s.checkAdmin(r)
		if subj := s.adminCert(r); !ok && subj != "" {
			client, ok = "cert:"+subj, true
		}
		if !ok && r.Method == http.MethodGet && r.URL.Path == dashboard.StreamPath {
			// The dashboard's pages read the stream with their session
			// cookie (SameSite=Strict; the stream only reads).
			client, ok = s.ui.Authenticated(r)
		}
		if !ok {
			w.Header().Set("WWW-Authenticate", `Bearer realm="keysvc admin"`)
			writeError(sw, errorf(http.StatusUnauthorized, "send Authorization: Bearer <contents of DATA/admin.token>", "admin API needs a valid bearer token"))
			if !s.anonAudit.take(r.Context(), remote, r.Method, path, "", s.now()) {
				return
			}
			s.record(r.Context(), audit.Event{Actor: "anonymous", Action: audit.ActionAdmin, Subject: path,
				Details: audit.Admin{Method: r.Method, Path: path, Status: sw.code(), Remote: remote}})
			return
		}
		if !s.byAdmin.allow(remote) {
			tooMany(sw, "address")
		} else {
			next.ServeHTTP(sw, r)
		}
		s.record(r.Context(), audit.Event{Actor: "admin", Action: audit.ActionAdmin, Subject: path,
			Details: audit.Admin{Method: r.Method, Path: path, Status: sw.code(), Remote: remote, Client: client}})
	})
}

// maxAuditPath bounds the request path an audit record keeps.
const maxAuditPath = 256

// auditPath is p cut to maxAuditPath bytes (on a rune boundary, marked
// with "…").
func auditPath(p string) string {
	if len(p) <= maxAuditPath {
		return p
	}
	p = p[:maxAuditPath]
	for len(p) > 0 && !utf8.ValidString(p) {
		p = p[:len(p)-1]
	}
	return p + "…"
}

// adminCert is the subject of r's admin client certificate, verified in
// the handshake against the admin client CAs, or "".
func (s *Server) adminCert(r *http.Request) string {
	if s.adminCAs == nil || r.TLS == nil || len(r.TLS.VerifiedChains) == 0 || len(r.TLS.VerifiedChains[0]) == 0 {
		return ""
	}
	return r.TLS.VerifiedChains[0][0].Subject.String()
}

func (s *Server) checkAdmin(r *http.Request) bool {
	h := r.Header.Get("Authorization")
	tok, ok := strings.CutPrefix(h, "Bearer ")
	if !ok {
		return false
	}
	sum := sha256.Sum256([]byte(strings.TrimSpace(tok)))
	return subtle.ConstantTimeCompare(sum[:], s.adminToken[:]) == 1
}

// record appends ev to the audit chain, best-effort: for outcomes of what
// already happened (a denial, an admin call's status, a read). A failure is
// logged loudly, and the chain's own check reports the damage. What changes
// state is recorded with intend instead.
func (s *Server) record(ctx context.Context, ev audit.Event) {
	if _, err := s.audit.Append(context.WithoutCancel(ctx), ev); err != nil {
		s.log.Error("audit append failed", slog.String("action", string(ev.Action)), slog.String("subject", ev.Subject), slog.Any("err", err))
	}
}

// intend appends ev, the record of a change an admin call is about to make,
// before it is made: fail-closed. If the append fails it answers 500 and
// returns false, and the caller must change nothing. If the change then
// fails, the call's outcome record (requireAdmin) carries its status.
func (s *Server) intend(w http.ResponseWriter, r *http.Request, ev audit.Event) bool {
	if _, err := s.audit.Append(context.WithoutCancel(r.Context()), ev); err != nil {
		if unavailable(w, err) {
			return false
		}
		s.log.Error("audit append failed; admin call refused", slog.String("action", string(ev.Action)),
			slog.String("subject", ev.Subject), slog.Any("err", err))
		writeError(w, errorf(http.StatusInternalServerError, "nothing was changed; run `keysvc audit verify` and repair the audit chain",
			"cannot record %s %q in the audit chain", ev.Action, ev.Subject))
		return false
	}
	return true
}

func remoteHost(r *http.Request) string {
	h, _, err := net.SplitHostPort(r.RemoteAddr)
	if err != nil {
		return r.RemoteAddr
	}
	return h
}

// mac is HMAC-SHA256 under the session key.
func (s *Server) mac(b []byte) []byte {
	m := hmac.New(sha256.New, s.sess.Load().cur)
	m.Write(b)
	return m.Sum(nil)
}
