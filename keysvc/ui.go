package keysvc

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/keygate/keygate/keysvc/api"
	"github.com/keygate/keygate/keysvc/audit"
	"github.com/keygate/keygate/keysvc/dashboard"
	"github.com/keygate/keygate/keysvc/store"
)

// uiBackend is the dashboard's view of the Server (dashboard.Backend).
type uiBackend struct{ s *Server }

var _ dashboard.Backend = uiBackend{}

// Chart and timeline bounds.
const (
	chartBuckets     = 24
	chartStep        = time.Hour
	timelineAudit    = 100 // unlocks and denials a VM page shows
	timelineAlert    = 100 // alerts a VM page shows
	auditVerifyEvery = 30 * time.Second
)

func (b uiBackend) CheckToken(token string) bool {
	sum := sha256.Sum256([]byte(token))
	return subtle.ConstantTimeCompare(sum[:], b.s.adminToken[:]) == 1
}

// Audit records a dashboard login, logout or refusal as an admin call:
// refused ones under the same per-source budget as the admin API's
// (anonAudit), so that a flood cannot grow the chain without bound.
func (b uiBackend) Audit(ctx context.Context, actor, what, remote string, ok bool) {
	s := b.s
	status := 200
	if !ok {
		status = 401
		if !s.anonAudit.take(ctx, remote, "POST", "/ui/", what, s.now()) {
			return
		}
	}
	s.record(ctx, audit.Event{Actor: actor, Action: audit.ActionAdmin, Subject: "/ui/",
		Details: audit.Admin{Method: "POST", Path: "/ui/ " + what, Status: status, Remote: remote, Client: actor}})
}

func uiStoreErr(err error) error {
	if errors.Is(err, store.ErrNotFound) {
		return fmt.Errorf("%w (%v)", dashboard.ErrNotFound, err)
	}
	return err
}

func (b uiBackend) Revoke(ctx context.Context, actor, vm string) error {
	_, err := b.s.revokeVM(ctx, "admin:"+actor, vm)
	return uiStoreErr(err)
}

func (b uiBackend) ArmLearn(ctx context.Context, actor, vm string) error {
	_, err := b.s.armLearn(ctx, "admin:"+actor, vm)
	return uiStoreErr(err)
}

func (b uiBackend) Erase(ctx context.Context, actor, volume string) error {
	_, err := b.s.eraseVolume(ctx, "admin:"+actor, volume)
	return uiStoreErr(err)
}

// auditIndex is what the dashboard reads from the audit chain, kept up to
// date incrementally (each read scans only the records appended since), so
// that a page costs a short scan and not the whole chain.
type auditIndex struct {
	mu   sync.Mutex
	next uint64 // the next seq to read
	vms  map[string]*vmHistory
	// The times of the last day's unlocks, denials and alerts, for the
	// charts; older ones are dropped on each refresh.
	unlocks, denials, alerts []time.Time
	verified                 dashboard.AuditState
}

type vmHistory struct {
	lastUnlock        time.Time
	warning, critical int // alerts since lastUnlock
	entries           []dashboard.Entry
}

func (ix *auditIndex) vm(name string) *vmHistory {
	if ix.vms == nil {
		ix.vms = map[string]*vmHistory{}
	}
	h := ix.vms[name]
	if h == nil {
		h = &vmHistory{}
		ix.vms[name] = h
	}
	return h
}

// refresh reads the records appended since the last refresh.
func (s *Server) refreshIndex(ctx context.Context) error {
	ix := &s.uiIndex
	ix.mu.Lock()
	defer ix.mu.Unlock()
	from := max(ix.next, 1)
	err := s.audit.Scan(ctx, from, func(rec audit.Record) error {
		ix.next = rec.Seq + 1
		vm, ok := strings.CutPrefix(rec.Actor, "vm:")
		if !ok {
			return nil
		}
		switch rec.Action {
		case audit.ActionUnlock:
			var d audit.Unlock
			json.Unmarshal(rec.Details, &d)
			h := ix.vm(vm)
			h.lastUnlock, h.warning, h.critical = rec.Time, 0, 0
			h.add(dashboard.Entry{Time: rec.Time, Kind: dashboard.EntryUnlock, Volume: rec.Subject})
			ix.unlocks = append(ix.unlocks, rec.Time)
		case audit.ActionDeny:
			var d audit.Deny
			json.Unmarshal(rec.Details, &d)
			e := dashboard.Entry{Time: rec.Time, Kind: dashboard.EntryDenial, Volume: rec.Subject, Reason: d.Reason, Rules: d.Rules}
			for _, m := range d.Mismatches {
				e.Mismatches = append(e.Mismatches, dashboard.Mismatch{PCR: m.PCR, Allowed: m.Allowed, Got: m.Got})
			}
			ix.vm(vm).add(e)
			ix.denials = append(ix.denials, rec.Time)
		case audit.ActionAlert:
			var d audit.Alert
			json.Unmarshal(rec.Details, &d)
			h := ix.vm(vm)
			switch d.Severity {
			case "critical":
				h.critical++
			case "warning":
				h.warning++
			}
			ix.alerts = append(ix.alerts, rec.Time)
		}
		return nil
	})
	cut := s.now().Add(-chartBuckets * chartStep)
	for _, ts := range []*[]time.Time{&ix.unlocks, &ix.denials, &ix.alerts} {
		i := sort.Search(len(*ts), func(i int) bool { return !(*ts)[i].Before(cut) })
		*ts = slices.Clone((*ts)[i:])
	}
	return err
}

func (h *vmHistory) add(e dashboard.Entry) {
	h.entries = append(h.entries, e)
	if len(h.entries) > timelineAudit {
		h.entries = slices.Clone(h.entries[len(h.entries)-timelineAudit:])
	}
}

// series counts ts into the chart's hourly buckets ending now.
func series(ts []time.Time, start time.Time) []int {
	out := make([]int, chartBuckets)
	for _, t := range ts {
		if i := int(t.Sub(start) / chartStep); i >= 0 && i < chartBuckets {
			out[i]++
		}
	}
	return out
}

func (b uiBackend) lastEventID(ctx context.Context) (int64, error) {
	if b.s.feed == nil {
		return 0, nil
	}
	return b.s.feed.LastEventID(ctx)
}

func (b uiBackend) row(ctx context.Context, v store.VM, h *vmHistory) (dashboard.VMRow, error) {
	s := b.s
	row := dashboard.VMRow{Name: v.Name, LearnArmed: v.LearnArmed}
	if err := s.rows.checkVM(v); err != nil {
		row.Tampered = err.Error()
	}
	if h != nil {
		row.LastAttested, row.Warning, row.Critical = h.lastUnlock, h.warning, h.critical
	}
	hb, err := s.st.ListEvents(ctx, store.EventFilter{VM: v.Name, Kind: api.KindHeartbeat, Limit: 1})
	if err != nil {
		return row, err
	}
	if len(hb) > 0 {
		row.LastHeartbeat = hb[0].Received
	}
	al, err := s.st.ListEvents(ctx, store.EventFilter{VM: v.Name, MinSeverity: "warning", Limit: 1})
	if err != nil {
		return row, err
	}
	if len(al) > 0 {
		var e api.Event
		if json.Unmarshal(al[0].Data, &e) == nil {
			row.Mode = e.Mode
		}
	}
	fresh := !row.LastHeartbeat.IsZero() && s.now().Sub(row.LastHeartbeat) < dashboard.DefaultStaleAfter &&
		!row.LastHeartbeat.Before(row.LastAttested)
	switch {
	case v.Revoked:
		row.State = dashboard.StateRevoked
	case row.LastAttested.IsZero():
		row.State = dashboard.StateNeverUnlocked
	case fresh:
		row.State = dashboard.StateServing
	default:
		row.State = dashboard.StateLocked
		row.Stale = true
	}
	return row, nil
}

func (b uiBackend) Fleet(ctx context.Context) (dashboard.Fleet, error) {
	s := b.s
	var f dashboard.Fleet
	var err error
	// The stream resumes after this ID: read it first, so that nothing
	// stored while the page is drawn is missed (at worst shown twice).
	if f.LastEventID, err = b.lastEventID(ctx); err != nil {
		return f, err
	}
	if err := s.refreshIndex(ctx); err != nil {
		return f, fmt.Errorf("read the audit chain: %w", err)
	}
	vms, err := s.st.ListVMs(ctx)
	if err != nil {
		return f, err
	}
	ix := &s.uiIndex
	ix.mu.Lock()
	hist := map[string]vmHistory{}
	for k, v := range ix.vms {
		hist[k] = *v
	}
	start := s.now().Truncate(chartStep).Add(-(chartBuckets - 1) * chartStep)
	f.Series = dashboard.Series{Start: start, Step: chartStep,
		Unlocks: series(ix.unlocks, start), Denials: series(ix.denials, start), Alerts: series(ix.alerts, start)}
	ix.mu.Unlock()
	for _, v := range vms {
		var hp *vmHistory
		if h, ok := hist[v.Name]; ok {
			hp = &h
		}
		row, err := b.row(ctx, v, hp)
		if err != nil {
			return f, err
		}
		f.VMs = append(f.VMs, row)
	}
	return f, nil
}

func (b uiBackend) VM(ctx context.Context, name string) (dashboard.VMDetail, error) {
	s := b.s
	var d dashboard.VMDetail
	var err error
	if d.LastEventID, err = b.lastEventID(ctx); err != nil {
		return d, err
	}
	if err := s.refreshIndex(ctx); err != nil {
		return d, fmt.Errorf("read the audit chain: %w", err)
	}
	v, err := s.st.GetVM(ctx, name)
	if err != nil {
		return d, uiStoreErr(err)
	}
	ix := &s.uiIndex
	ix.mu.Lock()
	var hp *vmHistory
	if h := ix.vms[name]; h != nil {
		c := *h
		c.entries = slices.Clone(h.entries)
		hp = &c
	}
	ix.mu.Unlock()
	if d.VMRow, err = b.row(ctx, v, hp); err != nil {
		return d, err
	}
	var pol bytes.Buffer
	if json.Indent(&pol, v.Policy, "", "  ") != nil || len(v.Policy) == 0 {
		pol.Reset()
		pol.WriteString("{}")
	}
	d.Policy = pol.String()
	vols, err := s.st.ListVolumes(ctx, name)
	if err != nil {
		return d, err
	}
	for _, vol := range vols {
		d.Volumes = append(d.Volumes, uiVolume(s, vol))
	}
	if hp != nil {
		d.Timeline = append(d.Timeline, hp.entries...)
	}
	alerts, err := s.st.ListEvents(ctx, store.EventFilter{VM: name, MinSeverity: "warning", Limit: timelineAlert})
	if err != nil {
		return d, err
	}
	hbs, err := s.st.ListEvents(ctx, store.EventFilter{VM: name, Kind: api.KindHeartbeat, Limit: 3})
	if err != nil {
		return d, err
	}
	for _, ev := range append(alerts, hbs...) {
		d.Timeline = append(d.Timeline, timelineEvent(ev))
	}
	sort.SliceStable(d.Timeline, func(i, j int) bool { return d.Timeline[i].Time.After(d.Timeline[j].Time) })
	return d, nil
}

func timelineEvent(ev store.VMEvent) dashboard.Entry {
	r := eventRecord(ev)
	e := dashboard.Entry{Time: ev.Received, Kind: dashboard.EntryAlert, Volume: ev.Volume, Severity: r.Severity, EventID: ev.ID,
		Technique: r.Kind, PID: r.PID, Comm: r.Comm, Exe: r.Exe, Path: r.Path, Overlap: r.Overlap, OverlapBytes: r.OverlapBytes,
		Denied: r.Denied, Mode: r.Mode, Reason: r.Message}
	if r.Kind == api.KindHeartbeat {
		e.Kind, e.Technique = dashboard.EntryHeartbeat, ""
	}
	if r.UID != nil {
		e.UID = strconv.FormatUint(uint64(*r.UID), 10)
	}
	return e
}

func uiVolume(s *Server, v store.Volume) dashboard.Volume {
	out := dashboard.Volume{ID: v.ID, VM: v.VM, Erased: v.Erased(), ErasedAt: v.ErasedAt, Created: v.Created}
	if err := s.rows.checkVolume(v); err != nil {
		out.Tampered = err.Error()
	}
	return out
}

func (b uiBackend) Volumes(ctx context.Context) ([]dashboard.Volume, error) {
	vols, err := b.s.st.ListVolumes(ctx, "")
	if err != nil {
		return nil, err
	}
	out := make([]dashboard.Volume, 0, len(vols))
	for _, v := range vols {
		out = append(out, uiVolume(b.s, v))
	}
	return out, nil
}

func (b uiBackend) AuditState(ctx context.Context) (dashboard.AuditState, error) {
	s := b.s
	ix := &s.uiIndex
	ix.mu.Lock()
	last := ix.verified
	ix.mu.Unlock()
	if !last.At.IsZero() && s.now().Sub(last.At) < auditVerifyEvery {
		return last, nil
	}
	rep, err := s.audit.Verify(ctx)
	if err != nil && !errors.Is(err, audit.ErrTampered) {
		return last, err
	}
	st := dashboard.AuditState{OK: rep.OK(), Records: rep.Records, VerifiedTo: rep.LastSeq, At: s.now()}
	for _, p := range rep.Problems {
		st.Problems = append(st.Problems, p.String())
	}
	if more, err := s.verifyStore(ctx, rep); err != nil {
		return last, err
	} else if len(more) > 0 {
		st.OK, st.Problems = false, append(st.Problems, more...)
	}
	if !st.OK && len(rep.Problems) > 0 && rep.Problems[0].Seq > 0 {
		st.VerifiedTo = rep.Problems[0].Seq - 1
	}
	ix.mu.Lock()
	ix.verified = st
	ix.mu.Unlock()
	return st, nil
}
