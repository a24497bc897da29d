package dashboard

import (
	"crypto/x509"
	"embed"
	"errors"
	"html/template"
	"io/fs"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"strings"
	"time"
)

//go:embed templates/*.html
var templateFS embed.FS

//go:embed static
var staticFS embed.FS

// ContentSecurityPolicy is sent with every dashboard response: only this
// origin's script and style files, no inline script or style, no frames.
const ContentSecurityPolicy = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; " +
	"connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"

// StreamPath is the event stream the pages' script reads.
const StreamPath = "/v1/admin/events/stream"

// DefaultStaleAfter is how long without a heartbeat makes an unlocked VM
// stale: three of boot's default heartbeat periods (30 s).
const DefaultStaleAfter = 90 * time.Second

// Options tune a Dashboard; zero fields take the defaults.
type Options struct {
	SessionTTL  time.Duration // DefaultSessionTTL
	SessionIdle time.Duration // DefaultSessionIdle
	Now         func() time.Time
	Log         *slog.Logger
	// ClientCAs, if set, lets a TLS client certificate that chains to
	// them log in (the admin listener must ask for one: see
	// keysvc's WithAdminClientCAs).
	ClientCAs *x509.CertPool
}

// Dashboard serves /ui/. Make it with New.
type Dashboard struct {
	b     Backend
	ss    *sessions
	fails failures
	pages map[string]*template.Template
	log   *slog.Logger
	now   func() time.Time
	cas   *x509.CertPool
	mux   *http.ServeMux
}

// New returns the dashboard over b.
func New(b Backend, o Options) (*Dashboard, error) {
	if o.SessionTTL <= 0 {
		o.SessionTTL = DefaultSessionTTL
	}
	if o.SessionIdle <= 0 {
		o.SessionIdle = DefaultSessionIdle
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.Log == nil {
		o.Log = slog.Default()
	}
	d := &Dashboard{b: b, ss: newSessions(o.SessionTTL, o.SessionIdle, o.Now), log: o.Log, now: o.Now, cas: o.ClientCAs,
		pages: map[string]*template.Template{}}
	d.fails.now = o.Now
	for _, p := range []string{"login", "fleet", "vm", "volumes"} {
		t, err := template.New("layout.html").Funcs(funcs).ParseFS(templateFS, "templates/layout.html", "templates/"+p+".html")
		if err != nil {
			return nil, err
		}
		d.pages[p] = t
	}
	static, err := fs.Sub(staticFS, "static")
	if err != nil {
		return nil, err
	}
	m := http.NewServeMux()
	m.Handle("GET /ui/static/", http.StripPrefix("/ui/static/", http.FileServerFS(static)))
	m.HandleFunc("GET /ui/login", d.loginPage)
	m.HandleFunc("POST /ui/login", d.login)
	m.HandleFunc("POST /ui/logout", d.logout)
	m.HandleFunc("GET /ui/{$}", d.page(d.fleet))
	m.HandleFunc("GET /ui/vm/{name}", d.page(d.vm))
	m.HandleFunc("GET /ui/volumes", d.page(d.volumes))
	m.HandleFunc("POST /ui/vm/{name}/revoke", d.action(d.revoke))
	m.HandleFunc("POST /ui/vm/{name}/learn", d.action(d.learn))
	m.HandleFunc("POST /ui/volume/{id}/erase", d.action(d.erase))
	m.HandleFunc("/ui/", func(w http.ResponseWriter, r *http.Request) {
		http.Error(w, "no such dashboard page; start at /ui/", http.StatusNotFound)
	})
	d.mux = m
	return d, nil
}

// ServeHTTP serves /ui/ with the security headers on every response.
func (d *Dashboard) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	h := w.Header()
	h.Set("Content-Security-Policy", ContentSecurityPolicy)
	h.Set("X-Content-Type-Options", "nosniff")
	h.Set("Referrer-Policy", "no-referrer")
	h.Set("X-Frame-Options", "DENY")
	h.Set("Cache-Control", "no-store")
	h.Set("Cross-Origin-Opener-Policy", "same-origin")
	h.Set("Cross-Origin-Resource-Policy", "same-origin")
	d.mux.ServeHTTP(w, r)
}

// Authenticated reports whether r carries a live dashboard session, and the
// actor it is audited as. keysvc's event stream takes it beside the token.
func (d *Dashboard) Authenticated(r *http.Request) (string, bool) {
	if s := d.ss.get(r); s != nil {
		return s.actor, true
	}
	return "", false
}

// SessionLive reports whether r's session is still live, without counting
// this as activity: an open event stream must not keep an idle session
// alive, and must end with it (keysvc's stream checks it as it goes).
func (d *Dashboard) SessionLive(r *http.Request) bool { return d.ss.live(r) }

func remote(r *http.Request) string {
	h, _, err := net.SplitHostPort(r.RemoteAddr)
	if err != nil {
		return r.RemoteAddr
	}
	return h
}

// sameOrigin checks that a POST came from a page of this origin. Browsers
// say where a request comes from in Origin and Sec-Fetch-Site. Under this
// dashboard's Referrer-Policy: no-referrer, a browser sends its own
// forms' POSTs with "Origin: null", so a null Origin passes only with
// "Sec-Fetch-Site: same-origin" (which a page cannot forge); an Origin that
// names a host must name this one; a request that says neither is refused.
func sameOrigin(r *http.Request) bool {
	site := r.Header.Get("Sec-Fetch-Site")
	if site != "" && site != "same-origin" {
		return false
	}
	o := r.Header.Get("Origin")
	if o == "" || o == "null" {
		return site == "same-origin"
	}
	u, err := url.Parse(o)
	return err == nil && u.Scheme == "https" && strings.EqualFold(u.Host, r.Host)
}

// view is what every page template gets.
type view struct {
	Title   string
	Session *session
	Flash   string
	Error   string
	Now     time.Time
	Data    any
	// Body attributes the script reads.
	Page        string
	VM          string
	LastEventID int64
	StaleAfter  time.Duration
}

func (d *Dashboard) render(w http.ResponseWriter, status int, page string, v view) {
	v.Now, v.Page = d.now(), page
	if v.StaleAfter == 0 {
		v.StaleAfter = DefaultStaleAfter
	}
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	var b strings.Builder
	if err := d.pages[page].Execute(&b, v); err != nil {
		d.log.Error("dashboard: render", slog.String("page", page), slog.Any("err", err))
		http.Error(w, "the page could not be drawn; see the key service's log", http.StatusInternalServerError)
		return
	}
	w.WriteHeader(status)
	w.Write([]byte(b.String()))
}

func (d *Dashboard) loginPage(w http.ResponseWriter, r *http.Request) {
	if d.ss.get(r) != nil {
		http.Redirect(w, r, "/ui/", http.StatusSeeOther)
		return
	}
	v := view{Title: "Log in"}
	if d.certSubject(r) != "" {
		v.Flash = "Your client certificate is accepted: log in without a token."
		v.Data = true
	}
	d.render(w, http.StatusOK, "login", v)
}

// certSubject is the subject of a verified admin client certificate, or "".
func (d *Dashboard) certSubject(r *http.Request) string {
	if d.cas == nil || r.TLS == nil || len(r.TLS.PeerCertificates) == 0 {
		return ""
	}
	leaf := r.TLS.PeerCertificates[0]
	inter := x509.NewCertPool()
	for _, c := range r.TLS.PeerCertificates[1:] {
		inter.AddCert(c)
	}
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: d.cas, Intermediates: inter, CurrentTime: d.now(),
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		return ""
	}
	return leaf.Subject.String()
}

func (d *Dashboard) login(w http.ResponseWriter, r *http.Request) {
	src := remote(r)
	if !sameOrigin(r) {
		d.b.Audit(r.Context(), "anonymous", "ui login: refused, not from this origin", src, false)
		http.Error(w, "login refused: the request did not come from this dashboard's own page (Origin)", http.StatusForbidden)
		return
	}
	if d.fails.blocked(src) {
		w.Header().Set("Retry-After", "60")
		http.Error(w, "too many failed logins from this address; wait a minute", http.StatusTooManyRequests)
		return
	}
	r.Body = http.MaxBytesReader(w, r.Body, 4<<10)
	via := ""
	if subj := d.certSubject(r); subj != "" && r.PostFormValue("cert") == "1" {
		via = "cert:" + subj
	} else if tok := strings.TrimSpace(r.PostFormValue("token")); tok != "" && d.b.CheckToken(tok) {
		via = "token"
	}
	if via == "" {
		d.fails.add(src)
		d.b.Audit(r.Context(), "anonymous", "ui login: wrong token", src, false)
		d.render(w, http.StatusUnauthorized, "login", view{Title: "Log in", Error: "That is not the admin token (DATA/admin.token)."})
		return
	}
	id, s := d.ss.create(via)
	d.b.Audit(r.Context(), s.actor, "ui login", src, true)
	http.SetCookie(w, &http.Cookie{Name: CookieName, Value: id, Path: "/", HttpOnly: true, Secure: true,
		SameSite: http.SameSiteStrictMode, MaxAge: int(d.ss.ttl / time.Second)})
	http.Redirect(w, r, "/ui/", http.StatusSeeOther)
}

func (d *Dashboard) logout(w http.ResponseWriter, r *http.Request) {
	s := d.ss.get(r)
	if s == nil || !sameOrigin(r) || !sameToken(r.PostFormValue("csrf"), s.CSRF) {
		http.Error(w, "logout refused: no session, or not from this dashboard's page", http.StatusForbidden)
		return
	}
	d.ss.end(r)
	d.b.Audit(r.Context(), s.actor, "ui logout", remote(r), true)
	http.SetCookie(w, &http.Cookie{Name: CookieName, Value: "", Path: "/", HttpOnly: true, Secure: true,
		SameSite: http.SameSiteStrictMode, MaxAge: -1})
	http.Redirect(w, r, "/ui/login", http.StatusSeeOther)
}

// page wraps a page handler: without a session it redirects to the login.
func (d *Dashboard) page(h func(http.ResponseWriter, *http.Request, *session)) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		s := d.ss.get(r)
		if s == nil {
			http.Redirect(w, r, "/ui/login", http.StatusSeeOther)
			return
		}
		h(w, r, s)
	}
}

// action wraps a state-changing POST: a session, this origin, and the
// session's CSRF token, or nothing happens (and the refusal is audited).
func (d *Dashboard) action(h func(http.ResponseWriter, *http.Request, *session) (string, error)) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		s := d.ss.get(r)
		if s == nil {
			d.b.Audit(r.Context(), "anonymous", "ui action without a session: "+r.URL.Path, remote(r), false)
			http.Error(w, "log in first (/ui/login)", http.StatusUnauthorized)
			return
		}
		r.Body = http.MaxBytesReader(w, r.Body, 4<<10)
		if !sameOrigin(r) || !sameToken(r.PostFormValue("csrf"), s.CSRF) {
			d.b.Audit(r.Context(), s.actor, "ui action refused (cross-site request): "+r.URL.Path, remote(r), false)
			http.Error(w, "refused: this request did not come from a dashboard page of this session (Origin and form token)", http.StatusForbidden)
			return
		}
		back, err := h(w, r, s)
		if err != nil {
			status := http.StatusInternalServerError
			var ue userError
			switch {
			case errors.Is(err, ErrNotFound):
				status = http.StatusNotFound
			case errors.As(err, &ue):
				status = http.StatusBadRequest
			}
			d.log.Warn("dashboard action failed", slog.String("path", r.URL.Path), slog.String("actor", s.actor), slog.Any("err", err))
			http.Error(w, err.Error(), status)
			return
		}
		http.Redirect(w, r, back, http.StatusSeeOther)
	}
}

// userError is a refused action the user can fix.
type userError string

func (e userError) Error() string { return string(e) }
