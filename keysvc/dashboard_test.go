package keysvc_test

import (
	"bufio"
	"encoding/json"
	"io"
	"net/http"
	"net/url"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/keygate/keygate/keysvc/api"
	"github.com/keygate/keygate/keysvc/audit"
	"github.com/keygate/keygate/keysvc/dashboard"
)

// ui is a browser of the dashboard without JavaScript: it keeps the
// session cookie and sends what a browser sends with a form.
type ui struct {
	t      *testing.T
	e      *env
	cookie *http.Cookie
}

// form posts a form with the given fetch headers (Origin, Sec-Fetch-Site;
// "" leaves one out), without following a redirect.
func (u *ui) form(path string, vals url.Values, origin, site string) *http.Response {
	u.t.Helper()
	req, _ := http.NewRequest("POST", "https://"+u.e.svc.AdminAddr()+path, strings.NewReader(vals.Encode()))
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	if origin != "" {
		req.Header.Set("Origin", origin)
	}
	if site != "" {
		req.Header.Set("Sec-Fetch-Site", site)
	}
	return u.send(req)
}

func (u *ui) get(path string) (*http.Response, string) {
	u.t.Helper()
	req, _ := http.NewRequest("GET", "https://"+u.e.svc.AdminAddr()+path, nil)
	resp := u.send(req)
	b, _ := io.ReadAll(resp.Body)
	return resp, string(b)
}

func (u *ui) send(req *http.Request) *http.Response {
	u.t.Helper()
	if u.cookie != nil {
		req.AddCookie(u.cookie)
	}
	c := *u.e.client
	c.CheckRedirect = func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }
	resp, err := c.Do(req)
	if err != nil {
		u.t.Fatalf("%s %s: %v", req.Method, req.URL.Path, err)
	}
	u.t.Cleanup(func() { resp.Body.Close() })
	return resp
}

func (u *ui) origin() string { return "https://" + u.e.svc.AdminAddr() }

func (u *ui) login() {
	u.t.Helper()
	resp := u.form("/ui/login", url.Values{"token": {u.e.token}}, u.origin(), "same-origin")
	if resp.StatusCode != http.StatusSeeOther {
		u.t.Fatalf("login: %d", resp.StatusCode)
	}
	for _, c := range resp.Cookies() {
		if c.Name == dashboard.CookieName {
			u.cookie = c
		}
	}
}

var csrfField = regexp.MustCompile(`name="csrf" value="([^"]+)"`)

// csrf reads the session's form token off a page.
func (u *ui) csrf() string {
	u.t.Helper()
	_, body := u.get("/ui/")
	m := csrfField.FindStringSubmatch(body)
	if m == nil {
		u.t.Fatalf("no csrf field on /ui/:\n%s", body)
	}
	return m[1]
}

func wantHeaders(t *testing.T, resp *http.Response) {
	t.Helper()
	h := resp.Header
	csp := h.Get("Content-Security-Policy")
	if !strings.Contains(csp, "script-src 'self'") || strings.Contains(csp, "unsafe-inline") || !strings.Contains(csp, "frame-ancestors 'none'") ||
		h.Get("X-Content-Type-Options") != "nosniff" || h.Get("Referrer-Policy") != "no-referrer" {
		t.Fatalf("%s: security headers missing: %v", resp.Request.URL.Path, h)
	}
}

// TestDashboardLogin: pages need a session; a wrong token gets nothing, is
// audited and, repeated, refused; a right one gets a cookie that is
// HttpOnly, Secure, SameSite=Strict and expires; logout ends it.
func TestDashboardLogin(t *testing.T) {
	e := startEnv(t, t.TempDir())
	v := openVM(t)
	setup(t, e, v, "ui-vm")
	u := &ui{t: t, e: e}

	for _, p := range []string{"/ui/", "/ui/vm/ui-vm", "/ui/volumes"} {
		resp, _ := u.get(p)
		if resp.StatusCode != http.StatusSeeOther || resp.Header.Get("Location") != "/ui/login" {
			t.Fatalf("GET %s without a session: %d to %q, want 303 to /ui/login", p, resp.StatusCode, resp.Header.Get("Location"))
		}
		wantHeaders(t, resp)
	}
	resp, body := u.get("/ui/login")
	if resp.StatusCode != http.StatusOK || !strings.Contains(body, `name="token"`) || strings.Contains(body, "<script>") {
		t.Fatalf("login page: %d\n%s", resp.StatusCode, body)
	}
	wantHeaders(t, resp)

	tests := []struct {
		name         string
		token        string
		origin, site string
		want         int
	}{
		{"no origin", e.token, "", "", http.StatusForbidden},
		{"other site", e.token, "https://evil.example", "cross-site", http.StatusForbidden},
		{"null origin, cross-site", e.token, "null", "cross-site", http.StatusForbidden},
		{"wrong token", strings.Repeat("x", 43), u.origin(), "same-origin", http.StatusUnauthorized},
		{"empty token", "", u.origin(), "same-origin", http.StatusUnauthorized},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			resp := u.form("/ui/login", url.Values{"token": {tc.token}}, tc.origin, tc.site)
			if resp.StatusCode != tc.want || len(resp.Cookies()) != 0 {
				t.Fatalf("login: %d with %d cookies, want %d and none", resp.StatusCode, len(resp.Cookies()), tc.want)
			}
		})
	}
	var recs []audit.Record
	json.Unmarshal(e.admin(t, "GET", "/v1/admin/audit", nil, http.StatusOK), &recs)
	refused := 0
	for _, r := range recs {
		if r.Actor == "anonymous" && strings.Contains(string(r.Details), "ui login") {
			refused++
		}
	}
	if refused != len(tests) {
		t.Fatalf("%d refused logins audited, want %d", refused, len(tests))
	}

	u.login()
	c := u.cookie
	if c == nil || !c.HttpOnly || !c.Secure || c.SameSite != http.SameSiteStrictMode || c.MaxAge <= 0 || c.Path != "/" {
		t.Fatalf("session cookie %+v: want HttpOnly, Secure, SameSite=Strict, Path=/, Max-Age", c)
	}
	resp, body = u.get("/ui/")
	if resp.StatusCode != http.StatusOK || !strings.Contains(body, "ui-vm") {
		t.Fatalf("fleet: %d\n%s", resp.StatusCode, body)
	}
	resp, body = u.get("/ui/vm/ui-vm")
	if resp.StatusCode != http.StatusOK || !strings.Contains(body, "ui-vm-vol") {
		t.Fatalf("vm page: %d\n%s", resp.StatusCode, body)
	}
	if resp, _ := u.get("/ui/vm/nope"); resp.StatusCode != http.StatusNotFound {
		t.Fatalf("vm page of no VM: %d", resp.StatusCode)
	}
	resp, body = u.get("/ui/volumes")
	if resp.StatusCode != http.StatusOK || !strings.Contains(body, "Verified") {
		t.Fatalf("volumes: %d\n%s", resp.StatusCode, body)
	}

	// Logout ends the session on the server: the old cookie opens nothing.
	if resp := u.form("/ui/logout", url.Values{"csrf": {u.csrf()}}, u.origin(), "same-origin"); resp.StatusCode != http.StatusSeeOther {
		t.Fatalf("logout: %d", resp.StatusCode)
	}
	if resp, _ := u.get("/ui/"); resp.StatusCode != http.StatusSeeOther {
		t.Fatalf("after logout, /ui/ answered %d", resp.StatusCode)
	}

	// Guessing is slowed: past the failures a source may make, even the
	// right token is refused for a while.
	for range 10 {
		u.form("/ui/login", url.Values{"token": {"guess"}}, u.origin(), "same-origin")
	}
	if resp := u.form("/ui/login", url.Values{"token": {e.token}}, u.origin(), "same-origin"); resp.StatusCode != http.StatusTooManyRequests {
		t.Fatalf("after 10 wrong tokens, login answered %d, want 429", resp.StatusCode)
	}
}

// TestDashboardActions: an action needs the session, this origin and the
// session's form token; it is audited with the session as actor; an erase
// needs the volume's ID typed.
func TestDashboardActions(t *testing.T) {
	e := startEnv(t, t.TempDir())
	v := openVM(t)
	setup(t, e, v, "act-vm")
	u := &ui{t: t, e: e}
	u.login()
	csrf := u.csrf()
	revoked := func() bool {
		var info api.VMInfo
		json.Unmarshal(e.admin(t, "GET", "/v1/admin/vms/act-vm", nil, http.StatusOK), &info)
		return info.Revoked
	}
	refusals := []struct {
		name         string
		csrf         string
		origin, site string
		anonymous    bool
	}{
		{"no token", "", u.origin(), "same-origin", false},
		{"wrong token", csrf + "x", u.origin(), "same-origin", false},
		{"other origin", csrf, "https://evil.example", "", false},
		{"cross-site", csrf, "null", "cross-site", false},
		{"no origin at all", csrf, "", "", false},
		{"no session", csrf, u.origin(), "same-origin", true},
	}
	for _, tc := range refusals {
		t.Run(tc.name, func(t *testing.T) {
			uu := *u
			if tc.anonymous {
				uu.cookie = nil
			}
			resp := uu.form("/ui/vm/act-vm/revoke", url.Values{"csrf": {tc.csrf}}, tc.origin, tc.site)
			if resp.StatusCode != http.StatusForbidden && resp.StatusCode != http.StatusUnauthorized {
				t.Fatalf("revoke: %d, want 403 or 401", resp.StatusCode)
			}
			if revoked() {
				t.Fatal("the VM was revoked by a refused request")
			}
		})
	}
	if resp := u.form("/ui/volume/act-vm-vol/erase", url.Values{"csrf": {csrf}, "confirm": {"act-vm"}}, u.origin(), "same-origin"); resp.StatusCode != http.StatusBadRequest {
		t.Fatalf("erase with the wrong ID typed: %d, want 400", resp.StatusCode)
	}
	// A browser's own form under no-referrer: Origin null, same-origin.
	if resp := u.form("/ui/vm/act-vm/revoke", url.Values{"csrf": {csrf}}, "null", "same-origin"); resp.StatusCode != http.StatusSeeOther {
		t.Fatalf("revoke: %d", resp.StatusCode)
	}
	if !revoked() {
		t.Fatal("the VM is not revoked")
	}
	if resp := u.form("/ui/volume/act-vm-vol/erase", url.Values{"csrf": {csrf}, "confirm": {"act-vm-vol"}}, u.origin(), ""); resp.StatusCode != http.StatusSeeOther {
		t.Fatalf("erase: %d", resp.StatusCode)
	}
	var vol api.VolumeInfo
	json.Unmarshal(e.admin(t, "GET", "/v1/admin/volumes/act-vm-vol", nil, http.StatusOK), &vol)
	if !vol.Erased {
		t.Fatal("the volume is not erased")
	}
	var recs []audit.Record
	json.Unmarshal(e.admin(t, "GET", "/v1/admin/audit", nil, http.StatusOK), &recs)
	actions := map[audit.Action]string{}
	for _, r := range recs {
		if r.Action == audit.ActionRevoke || r.Action == audit.ActionErase {
			actions[r.Action] = r.Actor
		}
	}
	for _, a := range []audit.Action{audit.ActionRevoke, audit.ActionErase} {
		if !strings.HasPrefix(actions[a], "admin:ui:") {
			t.Fatalf("%s audited as %q, want the dashboard session (admin:ui:…)", a, actions[a])
		}
	}
}

// sse reads Server-Sent Events: each event's id and data line.
type sse struct {
	r *bufio.Reader
}

func (s *sse) next(t *testing.T) (string, api.EventRecord) {
	t.Helper()
	var id string
	var data []string
	for {
		line, err := s.r.ReadString('\n')
		if err != nil {
			t.Fatalf("stream ended: %v", err)
		}
		line = strings.TrimRight(line, "\n")
		switch {
		case line == "" && len(data) > 0:
			if len(data) != 1 {
				t.Fatalf("event %s has %d data lines, want one", id, len(data))
			}
			var rec api.EventRecord
			if err := json.Unmarshal([]byte(data[0]), &rec); err != nil {
				t.Fatalf("data %q: %v", data[0], err)
			}
			return id, rec
		case strings.HasPrefix(line, "id: "):
			id = line[4:]
		case strings.HasPrefix(line, "data: "):
			data = append(data, line[6:])
		}
	}
}

// TestEventStream: the stream takes the token or a dashboard session,
// carries each new event as one JSON data line as it is stored, and
// resumes after Last-Event-ID.
func TestEventStream(t *testing.T) {
	e := startEnv(t, t.TempDir())
	v := openVM(t)
	sess := e.session(t, v, "stream-vm")
	u := &ui{t: t, e: e}
	open := func(bearer string, cookie *http.Cookie, lastID string) *http.Response {
		req, _ := http.NewRequest("GET", "https://"+e.svc.AdminAddr()+"/v1/admin/events/stream", nil)
		if bearer != "" {
			req.Header.Set("Authorization", "Bearer "+bearer)
		}
		if cookie != nil {
			req.AddCookie(cookie)
		}
		if lastID != "" {
			req.Header.Set("Last-Event-ID", lastID)
		}
		c := *e.client
		c.Timeout = 0
		resp, err := c.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { resp.Body.Close() })
		return resp
	}
	if resp := open("", nil, ""); resp.StatusCode != http.StatusUnauthorized {
		t.Fatalf("stream without credentials: %d", resp.StatusCode)
	}
	if resp := open("", &http.Cookie{Name: dashboard.CookieName, Value: "forged"}, ""); resp.StatusCode != http.StatusUnauthorized {
		t.Fatalf("stream with a forged session: %d", resp.StatusCode)
	}
	byToken := open(e.token, nil, "")
	u.login()
	bySession := open("", u.cookie, "")
	for _, r := range []*http.Response{byToken, bySession} {
		if r.StatusCode != http.StatusOK || r.Header.Get("Content-Type") != "text/event-stream" {
			t.Fatalf("stream: %d %s", r.StatusCode, r.Header.Get("Content-Type"))
		}
	}
	post := func(evs ...api.Event) {
		code, body := e.vm(t, "POST", "/v1/events", api.EventsRequest{Session: sess, Events: evs})
		if code != http.StatusOK {
			t.Fatalf("post events: %d %s", code, body)
		}
	}
	alert := api.Event{Kind: "proc_mem", Severity: "critical", PID: 7, Comm: "<svg/onload=1>\nx", Mode: "detect"}
	post(alert, api.Event{Kind: "heartbeat", Severity: "info"})
	a, b := &sse{bufio.NewReader(byToken.Body)}, &sse{bufio.NewReader(bySession.Body)}
	var firstID string
	for _, s := range []*sse{a, b} {
		id1, r1 := s.next(t)
		_, r2 := s.next(t)
		if r1.Kind != "proc_mem" || r1.Comm != alert.Comm || r1.VM != "stream-vm" || r2.Kind != "heartbeat" {
			t.Fatalf("streamed %+v then %+v", r1, r2)
		}
		firstID = id1
	}
	// Resume after the first: the second, then what comes next.
	c := &sse{bufio.NewReader(open(e.token, nil, firstID).Body)}
	if _, r := c.next(t); r.Kind != "heartbeat" {
		t.Fatalf("resumed after %s with %+v, want the heartbeat", firstID, r)
	}
	post(api.Event{Kind: "ptrace_attach", Severity: "warning"})
	for _, s := range []*sse{a, b, c} {
		if _, r := s.next(t); r.Kind != "ptrace_attach" {
			t.Fatalf("streamed %+v, want the ptrace_attach", r)
		}
	}
	// Logging out ends the session's stream; the token's runs on.
	if resp := u.form("/ui/logout", url.Values{"csrf": {u.csrf()}}, u.origin(), "same-origin"); resp.StatusCode != http.StatusSeeOther {
		t.Fatalf("logout: %d", resp.StatusCode)
	}
	ended := make(chan error, 1)
	go func() {
		_, err := io.Copy(io.Discard, b.r)
		ended <- err
	}()
	select {
	case <-ended:
	case <-time.After(30 * time.Second):
		t.Fatal("the session's stream runs on after logout")
	}
	post(api.Event{Kind: "proc_maps", Severity: "info"})
	if _, r := a.next(t); r.Kind != "proc_maps" {
		t.Fatalf("the token's stream: %+v", r)
	}
	if resp := open(e.token, nil, "x"); resp.StatusCode != http.StatusBadRequest {
		t.Fatalf("Last-Event-ID x: %d", resp.StatusCode)
	}
	// Shutdown ends open streams rather than waiting on them.
	done := make(chan error, 1)
	go func() { done <- e.svc.Shutdown(t.Context()) }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("shutdown with streams open: %v", err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("shutdown hangs on open streams")
	}
}
