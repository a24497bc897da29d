package dashboard

import (
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"encoding/hex"
	"net/http"
	"sync"
	"time"
)

// CookieName is the session cookie. The __Host- prefix makes the browser
// refuse it unless it is Secure, for path / and without a Domain.
const CookieName = "__Host-keygate-session"

// Session lifetimes (see Options).
const (
	DefaultSessionTTL  = 8 * time.Hour    // from login, whatever happens
	DefaultSessionIdle = 30 * time.Minute // since the last request
	maxSessions        = 1024             // beyond it, the oldest is ended
)

// session is a logged-in browser. Only the SHA-256 of its cookie value is
// kept, so that a heap dump holds no usable cookie.
type session struct {
	actor    string // for the audit chain: "ui:" and the first bytes of the hash
	CSRF     string // per-session token every POST form carries
	created  time.Time
	lastSeen time.Time
}

type sessions struct {
	mu   sync.Mutex
	m    map[[sha256.Size]byte]*session
	ttl  time.Duration
	idle time.Duration
	now  func() time.Time
}

func newSessions(ttl, idle time.Duration, now func() time.Time) *sessions {
	return &sessions{m: map[[sha256.Size]byte]*session{}, ttl: ttl, idle: idle, now: now}
}

func randomToken() string {
	var b [32]byte
	if _, err := rand.Read(b[:]); err != nil {
		panic("dashboard: no randomness: " + err.Error())
	}
	return base64.RawURLEncoding.EncodeToString(b[:])
}

// create starts a session and returns its cookie value. via names how it
// logged in ("token", "cert:<subject>").
func (ss *sessions) create(via string) (string, *session) {
	id := randomToken()
	h := sha256.Sum256([]byte(id))
	now := ss.now()
	s := &session{actor: "ui:" + hex.EncodeToString(h[:4]) + ":" + via, CSRF: randomToken(), created: now, lastSeen: now}
	ss.mu.Lock()
	defer ss.mu.Unlock()
	ss.sweep(now)
	if len(ss.m) >= maxSessions {
		var oldest [sha256.Size]byte
		var t time.Time
		for k, v := range ss.m {
			if t.IsZero() || v.created.Before(t) {
				oldest, t = k, v.created
			}
		}
		delete(ss.m, oldest)
	}
	ss.m[h] = s
	return id, s
}

// sweep ends expired sessions; ss.mu is held.
func (ss *sessions) sweep(now time.Time) {
	for k, v := range ss.m {
		if ss.expired(v, now) {
			delete(ss.m, k)
		}
	}
}

func (ss *sessions) expired(s *session, now time.Time) bool {
	return now.Sub(s.created) >= ss.ttl || now.Sub(s.lastSeen) >= ss.idle
}

// get returns r's live session, if any, and marks it seen.
func (ss *sessions) get(r *http.Request) *session {
	c, err := r.Cookie(CookieName)
	if err != nil || c.Value == "" || len(c.Value) > 128 {
		return nil
	}
	h := sha256.Sum256([]byte(c.Value))
	ss.mu.Lock()
	defer ss.mu.Unlock()
	s := ss.m[h]
	if s == nil {
		return nil
	}
	now := ss.now()
	if ss.expired(s, now) {
		delete(ss.m, h)
		return nil
	}
	s.lastSeen = now
	return s
}

// live reports whether r's session is live, without marking it seen.
func (ss *sessions) live(r *http.Request) bool {
	c, err := r.Cookie(CookieName)
	if err != nil {
		return false
	}
	h := sha256.Sum256([]byte(c.Value))
	ss.mu.Lock()
	defer ss.mu.Unlock()
	s := ss.m[h]
	return s != nil && !ss.expired(s, ss.now())
}

// end ends r's session, if any.
func (ss *sessions) end(r *http.Request) *session {
	c, err := r.Cookie(CookieName)
	if err != nil {
		return nil
	}
	h := sha256.Sum256([]byte(c.Value))
	ss.mu.Lock()
	defer ss.mu.Unlock()
	s := ss.m[h]
	delete(ss.m, h)
	return s
}

func sameToken(a, b string) bool {
	return len(a) == len(b) && subtle.ConstantTimeCompare([]byte(a), []byte(b)) == 1
}

// failures counts refused logins per source address in a fixed window, so
// that guessing the token is slow: past maxFailures in failWindow, the
// source is refused (429) before its token is looked at.
type failures struct {
	mu  sync.Mutex
	m   map[string]*failWindow
	now func() time.Time
}

type failWindow struct {
	start time.Time
	n     int
}

const (
	maxFailures   = 10
	failWindowLen = time.Minute
	maxFailSrcs   = 1 << 14
)

func (f *failures) blocked(src string) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	w := f.m[src]
	return w != nil && f.now().Sub(w.start) < failWindowLen && w.n >= maxFailures
}

func (f *failures) add(src string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	now := f.now()
	if f.m == nil {
		f.m = map[string]*failWindow{}
	}
	w := f.m[src]
	if w == nil || now.Sub(w.start) >= failWindowLen {
		if len(f.m) >= maxFailSrcs {
			for k, v := range f.m {
				if now.Sub(v.start) >= failWindowLen {
					delete(f.m, k)
				}
			}
			if len(f.m) >= maxFailSrcs {
				src = "\x00overflow" // many sources share one window
				w = f.m[src]
			}
		}
		if w == nil || now.Sub(w.start) >= failWindowLen {
			w = &failWindow{start: now}
			f.m[src] = w
		}
	}
	w.n++
}
