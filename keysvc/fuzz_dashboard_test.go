package keysvc_test

import (
	"bytes"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/keygate/keygate/keysvc/api"
	"github.com/keygate/keygate/keysvc/dashboard"
)

// FuzzDashboard sends outside bytes (a form, a cookie, the fetch headers,
// a Last-Event-ID) to the dashboard's pages and actions and to the event
// stream, with no valid session. No input may panic, change state, or get
// a dashboard answer without the security headers.
func FuzzDashboard(f *testing.F) {
	srv := newFuzzServer(f)
	h := srv.AdminHandler()
	do := func(method, path string, body []byte, hdr map[string]string) *httptest.ResponseRecorder {
		r := httptest.NewRequest(method, "https://127.0.0.1:8444"+path, bytes.NewReader(body))
		r.Header.Set("Content-Type", "application/x-www-form-urlencoded")
		for k, v := range hdr {
			r.Header.Set(k, v)
		}
		w := httptest.NewRecorder()
		h.ServeHTTP(w, r)
		return w
	}
	auth := map[string]string{"Authorization": "Bearer " + fuzzToken, "Content-Type": "application/json"}
	b, _ := json.Marshal(api.EnrollRequest{Name: "vm", EKPub: randomPEM(f), AKPub: randomPEM(f)})
	if w := do("POST", "/v1/admin/vms", b, auth); w.Code != http.StatusCreated {
		f.Fatalf("enroll: %d %s", w.Code, w.Body)
	}
	routes := []struct{ method, path string }{
		{"GET", "/ui/"}, {"GET", "/ui/vm/vm"}, {"GET", "/ui/volumes"}, {"GET", "/ui/login"},
		{"POST", "/ui/login"}, {"POST", "/ui/logout"}, {"POST", "/ui/vm/vm/revoke"}, {"POST", "/ui/vm/vm/learn"},
		{"POST", "/ui/volume/vol/erase"}, {"GET", "/v1/admin/events/stream"}, {"GET", "/ui/static/app.js"},
	}
	f.Add(uint8(4), []byte("token=0123456789abcdef0123456789abcdeX"), "", "https://127.0.0.1:8444", "same-origin", "")
	f.Add(uint8(6), []byte("csrf=AAAA"), "AAAA", "null", "same-origin", "")
	f.Add(uint8(8), []byte("csrf=x&confirm=vol"), "x", "https://127.0.0.1:8444", "", "")
	f.Add(uint8(9), []byte{}, "x", "", "", "12")
	f.Add(uint8(1), []byte{}, strings.Repeat("A", 200), "", "", "-1")
	f.Fuzz(func(t *testing.T, which uint8, form []byte, cookie, origin, site, lastID string) {
		rt := routes[int(which)%len(routes)]
		hdr := map[string]string{"Origin": origin, "Sec-Fetch-Site": site, "Last-Event-ID": lastID}
		if cookie != "" {
			hdr["Cookie"] = dashboard.CookieName + "=" + cookie
		}
		w := do(rt.method, rt.path, form, hdr)
		if strings.HasPrefix(rt.path, "/ui/") && !strings.Contains(w.Header().Get("Content-Security-Policy"), "frame-ancestors 'none'") {
			t.Fatalf("%s %s: %d without the security headers", rt.method, rt.path, w.Code)
		}
		if rt.method == "POST" && rt.path != "/ui/login" && w.Code < 400 {
			t.Fatalf("%s %s without a session: %d", rt.method, rt.path, w.Code)
		}
		if rt.path == "/v1/admin/events/stream" && w.Code != http.StatusUnauthorized {
			t.Fatalf("stream without credentials: %d", w.Code)
		}
		var vm api.VMInfo
		if w := do("GET", "/v1/admin/vms/vm", nil, auth); json.Unmarshal(w.Body.Bytes(), &vm) != nil || vm.Revoked || vm.LearnArmed {
			t.Fatalf("the VM changed: %s", w.Body)
		}
	})
}
