package keysvc

import (
	"context"
	"fmt"
	"net/http"
	"sync"
	"time"
	"unicode/utf8"

	"github.com/keygate/keygate/keysvc/audit"
)

// DefaultRefusalAuditRate is how many refusals per second one source
// address may add to the audit chain one by one (burst: twice that); past
// it they are counted and summarised (see auditBudget, WithRefusalAuditRate).
const DefaultRefusalAuditRate = 20

// WithRefusalAuditRate sets how many VM API refusals per second from one
// source address are audited one by one (DefaultRefusalAuditRate
// otherwise; zero records every one). Releases are always recorded.
func WithRefusalAuditRate(perSource float64) Option {
	return func(s *Server) { s.auditRate = perSource }
}

// auditBudget bounds how many records requests from one source address add
// to the audit chain, so that requests nobody authenticated cannot grow it
// without bound: up to the budget's rate each gets its own record; past it
// they are counted per address and written as one summary record, when the
// address is next within its budget, or when FlushAudit runs (every minute
// and at shutdown). Its memory is bounded as a limiter's: past maxBuckets
// addresses, new ones share one entry.
//
// The admin API uses one for unauthenticated requests (anonSummary), the VM
// API one for its refusals (refusalSummary).
type auditBudget struct {
	lim     *limiter
	sup     suppressedSet
	summary func(src string, e suppressed) audit.Event
	s       *Server
}

func (s *Server) newAuditBudget(rate float64, summary func(string, suppressed) audit.Event) *auditBudget {
	return &auditBudget{lim: newLimiter(rate, time.Now), summary: summary, s: s}
}

// take reports whether a request from remote may be recorded one by one;
// if not, it is counted for the summary. When it may, the summary of what
// was counted before is written first, so that the chain keeps the order.
func (b *auditBudget) take(ctx context.Context, remote, method, path, reason string, now time.Time) bool {
	if !b.lim.allow(remote) {
		b.sup.add(remote, method, path, reason, now)
		return false
	}
	b.flush(ctx, remote)
	return true
}

// flush writes one summary record for each address (remote, or all if
// remote is "") with requests counted but not recorded. A summary whose
// append fails is logged, like any outcome record.
func (b *auditBudget) flush(ctx context.Context, remote string) {
	for src, e := range b.sup.take(remote) {
		b.s.record(ctx, b.summary(src, e))
	}
}

// budget takes from the VM API's refusal budget for remote.
func (s *Server) budget(remote string) bool {
	return s.vmAudit.take(context.Background(), remote, "", "", "", s.now())
}

func anonSummary(src string, e suppressed) audit.Event {
	return audit.Event{Actor: "anonymous", Action: audit.ActionAdmin,
		Subject: fmt.Sprintf("%d more unauthenticated requests from %s between %s and %s (over the per-source rate; not recorded one by one)",
			e.n, src, e.first.UTC().Format(time.RFC3339), e.last.UTC().Format(time.RFC3339)),
		Details: audit.Admin{Method: e.method, Path: e.path, Status: http.StatusUnauthorized, Remote: src}}
}

func refusalSummary(src string, e suppressed) audit.Event {
	return audit.Event{Actor: "keysvc", Action: audit.ActionDeny,
		Subject: fmt.Sprintf("%d more refused VM API requests from %s between %s and %s (over the per-source audit budget; not recorded one by one)",
			e.n, src, e.first.UTC().Format(time.RFC3339), e.last.UTC().Format(time.RFC3339)),
		Details: audit.Summary{Remote: src, Count: e.n, First: e.first.UTC().Format(time.RFC3339Nano),
			Last: e.last.UTC().Format(time.RFC3339Nano), Reason: e.reason, Path: e.path}}
}

// FlushAudit writes the summary records of requests that were kept out of
// the audit chain by a per-source budget (unauthenticated admin requests,
// VM API refusals). Service calls it periodically and on shutdown.
func (s *Server) FlushAudit(ctx context.Context) {
	s.anonAudit.flush(ctx, "")
	s.vmAudit.flush(ctx, "")
}

// suppressedSet counts, per source address, the requests that were not
// audited one by one. Its size is bounded as a limiter's: past maxBuckets
// addresses, new ones share one entry.
type suppressedSet struct {
	mu sync.Mutex
	m  map[string]*suppressed
}

type suppressed struct {
	n                    uint64
	first, last          time.Time
	method, path, reason string // of the last one
}

const overflowSource = "(many addresses)"

func (ss *suppressedSet) add(remote, method, path, reason string, now time.Time) {
	ss.mu.Lock()
	defer ss.mu.Unlock()
	if ss.m == nil {
		ss.m = make(map[string]*suppressed)
	}
	e := ss.m[remote]
	if e == nil {
		if len(ss.m) >= maxBuckets {
			remote = overflowSource
			e = ss.m[remote]
		}
		if e == nil {
			e = &suppressed{first: now}
			ss.m[remote] = e
		}
	}
	e.n++
	e.last, e.method, e.path, e.reason = now, method, path, reason
}

// take removes and returns the counts of remote, or of every address if
// remote is "".
func (ss *suppressedSet) take(remote string) map[string]suppressed {
	ss.mu.Lock()
	defer ss.mu.Unlock()
	out := map[string]suppressed{}
	for k, e := range ss.m {
		if remote == "" || k == remote {
			out[k] = *e
			delete(ss.m, k)
		}
	}
	return out
}

// maxRecordedName is the longest VM name or volume ID a record keeps from
// an unauthenticated request: the store's own limit (store.validID), so a
// name longer than any that can exist is cut, not copied into the chain.
const maxRecordedName = 128

// capName is name cut to maxRecordedName bytes on a rune boundary, marked
// with "…" when cut.
func capName(name string) string {
	if len(name) <= maxRecordedName {
		return name
	}
	name = name[:maxRecordedName]
	for len(name) > 0 && !utf8.ValidString(name) {
		name = name[:len(name)-1]
	}
	return name + "…"
}
