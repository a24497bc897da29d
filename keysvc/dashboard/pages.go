package dashboard

import (
	"errors"
	"fmt"
	"html/template"
	"log/slog"
	"net/http"
	"net/url"
	"strings"
	"time"
)

var funcs = template.FuncMap{
	"when": func(t time.Time) string {
		if t.IsZero() {
			return "never"
		}
		return t.UTC().Format("2006-01-02 15:04:05Z")
	},
	"iso": func(t time.Time) string {
		if t.IsZero() {
			return ""
		}
		return t.UTC().Format(time.RFC3339Nano)
	},
	"ago": func(now, t time.Time) string {
		if t.IsZero() {
			return ""
		}
		return "(" + now.Sub(t).Round(time.Second).String() + " ago)"
	},
	"pathEscape": url.PathEscape,
	"chart":      chart,
	"stateClass": func(s string) string { return "state-" + strings.ReplaceAll(s, " ", "-") },
	"join":       strings.Join,
}

func (d *Dashboard) fail(w http.ResponseWriter, what string, err error) {
	if errors.Is(err, ErrNotFound) {
		http.Error(w, what+": not found", http.StatusNotFound)
		return
	}
	d.log.Error("dashboard: "+what, slog.Any("err", err))
	http.Error(w, what+" failed; see the key service's log", http.StatusInternalServerError)
}

func (d *Dashboard) fleet(w http.ResponseWriter, r *http.Request, s *session) {
	f, err := d.b.Fleet(r.Context())
	if err != nil {
		d.fail(w, "read the fleet", err)
		return
	}
	d.render(w, http.StatusOK, "fleet", view{Title: "Fleet", Session: s, Data: f, LastEventID: f.LastEventID})
}

func (d *Dashboard) vm(w http.ResponseWriter, r *http.Request, s *session) {
	name := r.PathValue("name")
	v, err := d.b.VM(r.Context(), name)
	if err != nil {
		d.fail(w, fmt.Sprintf("read vm %q", name), err)
		return
	}
	d.render(w, http.StatusOK, "vm", view{Title: "VM " + v.Name, Session: s, Data: v, VM: v.Name, LastEventID: v.LastEventID,
		Flash: r.URL.Query().Get("done")})
}

type volumesPage struct {
	Volumes  []Volume
	Audit    AuditState
	AuditErr string
}

func (d *Dashboard) volumes(w http.ResponseWriter, r *http.Request, s *session) {
	vols, err := d.b.Volumes(r.Context())
	if err != nil {
		d.fail(w, "list volumes", err)
		return
	}
	p := volumesPage{Volumes: vols}
	if p.Audit, err = d.b.AuditState(r.Context()); err != nil {
		d.log.Error("dashboard: verify the audit chain", slog.Any("err", err))
		p.AuditErr = "the audit chain could not be read; see the key service's log"
	}
	d.render(w, http.StatusOK, "volumes", view{Title: "Volumes", Session: s, Data: p, Flash: r.URL.Query().Get("done")})
}

func done(path, msg string) string { return path + "?done=" + url.QueryEscape(msg) }

func (d *Dashboard) revoke(w http.ResponseWriter, r *http.Request, s *session) (string, error) {
	name := r.PathValue("name")
	if err := d.b.Revoke(r.Context(), s.actor, name); err != nil {
		return "", fmt.Errorf("revoke vm %q: %w", name, err)
	}
	return done("/ui/vm/"+url.PathEscape(name), "Revoked: its volumes lock at the VM's next heartbeat."), nil
}

func (d *Dashboard) learn(w http.ResponseWriter, r *http.Request, s *session) (string, error) {
	name := r.PathValue("name")
	if err := d.b.ArmLearn(r.Context(), s.actor, name); err != nil {
		return "", fmt.Errorf("arm learn mode of vm %q: %w", name, err)
	}
	return done("/ui/vm/"+url.PathEscape(name), "Learn mode armed: the next attested boot's PCRs become the policy."), nil
}

func (d *Dashboard) erase(w http.ResponseWriter, r *http.Request, s *session) (string, error) {
	id := r.PathValue("id")
	if r.PostFormValue("confirm") != id {
		return "", userError(fmt.Sprintf("nothing erased: type the volume's ID (%s) in the box to confirm", id))
	}
	if err := d.b.Erase(r.Context(), s.actor, id); err != nil {
		return "", fmt.Errorf("erase volume %q: %w", id, err)
	}
	return done("/ui/volumes", "Volume "+id+" erased: its unwrap key is destroyed."), nil
}

// bar is one bar of a chart.
type bar struct {
	X, Y, W, H int
	N          int
	Label      string
}

// svgChart is a bar chart drawn by the chart template: numbers only, so no
// outside text reaches the SVG.
type svgChart struct {
	Title  string
	Class  string
	Width  int
	Height int
	Max    int
	Bars   []bar
	From   string
	To     string
}

const chartW, chartH, chartPad = 480, 120, 18

// chart lays out counts as bars from start, step apart.
func chart(title, class string, counts []int, start time.Time, step time.Duration) svgChart {
	c := svgChart{Title: title, Class: class, Width: chartW, Height: chartH + 2*chartPad}
	for _, n := range counts {
		c.Max = max(c.Max, n)
	}
	if len(counts) == 0 {
		return c
	}
	bw := chartW / len(counts)
	for i, n := range counts {
		h := 0
		if c.Max > 0 {
			h = n * chartH / c.Max
		}
		if n > 0 && h == 0 {
			h = 1
		}
		t := start.Add(time.Duration(i) * step).UTC()
		c.Bars = append(c.Bars, bar{X: i * bw, Y: chartPad + chartH - h, W: max(bw-1, 1), H: h, N: n,
			Label: fmt.Sprintf("%s: %d", t.Format("15:04"), n)})
	}
	c.From = start.UTC().Format("Jan 2 15:04")
	c.To = start.Add(time.Duration(len(counts))*step).UTC().Format("Jan 2 15:04") + " UTC"
	return c
}
