package ebpfmon

import (
	"errors"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cilium/ebpf/ringbuf"
)

// scriptReader replays a fixed sequence of ring buffer reads, then reports
// the reader closed.
type scriptReader struct {
	steps []readStep
}

type readStep struct {
	rec []byte
	err error
}

func (r *scriptReader) Read() (ringbuf.Record, error) {
	if len(r.steps) == 0 {
		return ringbuf.Record{}, ringbuf.ErrClosed
	}
	s := r.steps[0]
	r.steps = r.steps[1:]
	return ringbuf.Record{RawSample: s.rec}, s.err
}

func repeat(n int, s readStep) []readStep {
	out := make([]readStep, n)
	for i := range out {
		out[i] = s
	}
	return out
}

// TestReadLoop checks the ring buffer reader's accounting: every failed
// read and every record that does not decode is counted (Stats), events
// below MinSeverity are counted and not delivered, and a failure that
// persists stops the reader with an error instead of spinning. The records
// are the kernel's format; the failures are injected, since a real ring
// buffer cannot be made to fail on demand.
func TestReadLoop(t *testing.T) {
	crit := record(t, monitorEvent{Technique: 7}) // proc_mem: critical
	info := record(t, monitorEvent{Technique: 8}) // proc_environ: info
	bad := record(t, monitorEvent{Technique: 99}) // no such technique
	short := []byte{1, 2, 3}                      // a record of another layout
	eio := errors.New("input/output error")
	tests := []struct {
		name                 string
		steps                []readStep
		delivered            int
		readErrs, decodeErrs uint64
		below                uint64
		wantErr              string // substring of the error that stops the reader; "" for a clean end
	}{
		{name: "events, one below the minimum", steps: []readStep{{rec: crit}, {rec: info}, {rec: crit}}, delivered: 2, below: 1},
		{name: "transient read errors are counted", steps: append(repeat(maxReadErrors-1, readStep{err: eio}), readStep{rec: crit}), delivered: 1, readErrs: maxReadErrors - 1},
		{name: "persistent read errors stop the reader", steps: append(repeat(maxReadErrors, readStep{err: eio}), readStep{rec: crit}), readErrs: maxReadErrors,
			wantErr: "read the BPF ring buffer: 10 failures in a row"},
		{name: "records that do not decode are counted", steps: []readStep{{rec: bad}, {rec: short}, {rec: crit}}, delivered: 1, decodeErrs: 2},
		{name: "no record decoding stops the reader", steps: repeat(maxDecodeErrors+5, readStep{rec: short}), decodeErrs: maxDecodeErrors,
			wantErr: "did not decode"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			m := &Monitor{events: make(chan Event, 16), done: make(chan struct{}), minSev: Warning, counts: map[countKey]*atomic.Uint64{}}
			for _, tq := range Techniques() {
				for _, sv := range Severities() {
					m.counts[countKey{tq, sv}] = new(atomic.Uint64)
				}
			}
			m.wg.Add(1)
			start := time.Now()
			go m.read(&scriptReader{steps: tc.steps})
			n := 0
			for range m.events {
				n++
			}
			if n != tc.delivered {
				t.Errorf("%d events delivered, want %d", n, tc.delivered)
			}
			if got := m.readErrs.Load(); got != tc.readErrs {
				t.Errorf("%d read errors counted, want %d", got, tc.readErrs)
			}
			if got := m.decodeErrs.Load(); got != tc.decodeErrs {
				t.Errorf("%d decode errors counted, want %d", got, tc.decodeErrs)
			}
			var below uint64
			for k, c := range m.counts {
				if !k.s.AtLeast(m.minSev) {
					below += c.Load()
				}
			}
			if below != tc.below {
				t.Errorf("%d events counted below the minimum severity, want %d", below, tc.below)
			}
			err := m.Err()
			switch {
			case tc.wantErr == "" && err != nil:
				t.Errorf("Err %v, want nil", err)
			case tc.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tc.wantErr)):
				t.Errorf("Err %v, want one saying %q", err, tc.wantErr)
			case tc.wantErr != "" && !errors.Is(err, eio) && tc.readErrs > 0:
				t.Errorf("Err %v does not wrap the read error", err)
			}
			// The backoff doubles from 1 ms: ten failures take about a
			// second, not a spin and not an hour.
			if d := time.Since(start); d > 10*time.Second {
				t.Errorf("reader took %v", d)
			}
		})
	}
}
