package keysvc

import (
	"encoding/json"
	"os"
	"regexp"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/keygate/keygate/keysvc/alert"
)

// registeredNames are the metric names keysvc registers, with alert
// delivery on.
func registeredNames(t *testing.T) map[string]bool {
	t.Helper()
	m := newMetrics()
	d, err := alert.NewDispatcher(nil, alert.Config{})
	if err != nil {
		t.Fatal(err)
	}
	m.register(d.Collectors()...)
	ch := make(chan *prometheus.Desc, 256)
	go func() {
		for _, c := range m.all {
			c.Describe(ch)
		}
		close(ch)
	}()
	fq := regexp.MustCompile(`fqName: "([a-zA-Z_:][a-zA-Z0-9_:]*)"`)
	names := map[string]bool{}
	for desc := range ch {
		if s := fq.FindStringSubmatch(desc.String()); s != nil {
			names[s[1]] = true
		}
	}
	return names
}

// TestGrafanaDashboard: docs/grafana-dashboard.json parses, has panels
// with queries, and every metric its queries name is one keysvc
// registers (a histogram's _bucket, _sum and _count included).
func TestGrafanaDashboard(t *testing.T) {
	b, err := os.ReadFile("../docs/grafana-dashboard.json")
	if err != nil {
		t.Fatal(err)
	}
	var dash struct {
		Title  string `json:"title"`
		Panels []struct {
			Title   string `json:"title"`
			Targets []struct {
				Expr string `json:"expr"`
			} `json:"targets"`
		} `json:"panels"`
	}
	if err := json.Unmarshal(b, &dash); err != nil {
		t.Fatalf("docs/grafana-dashboard.json: %v", err)
	}
	names := registeredNames(t)
	for _, want := range []string{"keysvc_unlocks_total", "keysvc_alert_dead_letters", "keysvc_event_streams"} {
		if !names[want] {
			t.Fatalf("registered metrics lack %s (the test's own list is wrong): %v", want, names)
		}
	}
	metric := regexp.MustCompile(`\b(keysvc_[a-z0-9_]+|process_[a-z0-9_]+|go_[a-z0-9_]+)\b`)
	queries := 0
	for _, p := range dash.Panels {
		if len(p.Targets) == 0 {
			t.Errorf("panel %q has no query", p.Title)
		}
		for _, tg := range p.Targets {
			queries++
			found := metric.FindAllString(tg.Expr, -1)
			if len(found) == 0 {
				t.Errorf("panel %q: query %q names no keysvc metric", p.Title, tg.Expr)
			}
			for _, n := range found {
				base := n
				for _, suf := range []string{"_bucket", "_sum", "_count"} {
					if b, ok := strings.CutSuffix(n, suf); ok && names[b] {
						base = b
					}
				}
				if !names[base] {
					t.Errorf("panel %q: query %q names %s, which keysvc does not register", p.Title, tg.Expr, n)
				}
			}
		}
	}
	if queries == 0 {
		t.Fatal("the dashboard has no queries")
	}
}
