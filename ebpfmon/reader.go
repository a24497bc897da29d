package ebpfmon

import (
	"errors"
	"fmt"
	"time"

	"github.com/cilium/ebpf/ringbuf"
)

// The ring buffer's reader: it decodes records into Events, counts every
// event and every loss, and stops with an error rather than spin.

// Stats counts what the monitor saw and what it lost.
type Stats struct {
	// Drops counts events the kernel could not queue: the ring buffer was
	// full because the Events reader fell behind.
	Drops uint64 `json:"drops"`
	// ReadErrors counts failed reads of the ring buffer, DecodeErrors
	// records that did not decode (BPF objects and Go out of step: run make
	// generate). Each may have been an event.
	ReadErrors   uint64 `json:"read_errors"`
	DecodeErrors uint64 `json:"decode_errors"`
	// Events counts every event decoded, by technique and severity,
	// whether or not Events delivered it (Config.MinSeverity).
	Events map[Technique]map[Severity]uint64 `json:"events"`
	// Below counts the events not delivered for being below MinSeverity.
	Below uint64 `json:"below_min_severity"`
}

type countKey struct {
	t Technique
	s Severity
}

// count returns how many events of technique t with severity s were decoded.
func (m *Monitor) count(t Technique, s Severity) uint64 {
	if c := m.counts[countKey{t, s}]; c != nil {
		return c.Load()
	}
	return 0
}

// Stats reads the kernel's counters and the reader's.
func (m *Monitor) Stats() (Stats, error) {
	s := Stats{ReadErrors: m.readErrs.Load(), DecodeErrors: m.decodeErrs.Load(), Events: map[Technique]map[Severity]uint64{}}
	for k, c := range m.counts {
		n := c.Load()
		if n == 0 {
			continue
		}
		if s.Events[k.t] == nil {
			s.Events[k.t] = map[Severity]uint64{}
		}
		s.Events[k.t][k.s] = n
		if !k.s.AtLeast(m.minSev) {
			s.Below += n
		}
	}
	var per []uint64
	if err := m.objs.Drops.Lookup(uint32(0), &per); err != nil {
		return s, fmt.Errorf("read drop counter: %v", err)
	}
	for _, v := range per {
		s.Drops += v
	}
	return s, nil
}

// Err says why the monitor stopped delivering events on its own, if it
// did: the ring buffer kept failing to read, or none of its records
// decoded. Events is closed then; it is nil after a Close or a cancelled
// context.
func (m *Monitor) Err() error {
	if p := m.err.Load(); p != nil {
		return *p
	}
	return nil
}

// recordReader is what read needs of a *ringbuf.Reader; tests hand it
// readers that fail.
type recordReader interface {
	Read() (ringbuf.Record, error)
}

// The reader gives up after this many failures in a row, rather than spin on
// an error that will not clear: a monitor that reports nothing must say so.
// A single success resets the count. readBackoff is the pause after each
// failure, doubling, so that the limit spans more than a passing hiccup.
const (
	maxReadErrors   = 10
	maxDecodeErrors = 64
	readBackoff     = time.Millisecond
)

func (m *Monitor) read(rd recordReader) {
	defer m.wg.Done()
	defer close(m.events)
	if err := m.readLoop(rd); err != nil {
		m.err.Store(&err)
	}
}

// readLoop delivers records until the reader is closed (nil), or fails
// persistently (an error saying what failed and that the monitor stopped).
// Every failed read and every record that does not decode is counted
// (Stats), and so never lost silently.
func (m *Monitor) readLoop(rd recordReader) error {
	readFails, decodeFails := 0, 0
	pause := readBackoff
	for {
		rec, err := rd.Read()
		if err != nil {
			if errors.Is(err, ringbuf.ErrClosed) {
				return nil
			}
			m.readErrs.Add(1)
			if readFails++; readFails >= maxReadErrors {
				return fmt.Errorf("read the BPF ring buffer: %d failures in a row, the last: %w; the monitor stopped (restart it)", readFails, err)
			}
			select {
			case <-time.After(pause):
			case <-m.done:
				return nil
			}
			pause *= 2
			continue
		}
		readFails, pause = 0, readBackoff
		if e, ok := m.lostEvent(); ok && !m.deliver(e) {
			return nil
		}
		raw, err := decodeRecord(rec.RawSample)
		if err != nil {
			m.decodeErrs.Add(1)
			if decodeFails++; decodeFails >= maxDecodeErrors {
				return fmt.Errorf("%d ring buffer records in a row did not decode, the last: %w; the monitor stopped", decodeFails, err)
			}
			continue
		}
		decodeFails = 0
		e := toEvent(raw, m.bootTime, m.mode)
		if !m.deliver(e) {
			return nil
		}
	}
}

// deliver counts e and hands it to Events if it is at or above the minimum
// severity; false means the monitor is closing.
func (m *Monitor) deliver(e Event) bool {
	if c := m.counts[countKey{e.Technique, e.Severity}]; c != nil {
		c.Add(1)
	}
	if !e.Severity.AtLeast(m.minSev) {
		return true
	}
	e.ReceivedNS = MonotonicNow()
	if e.TGID != 0 {
		e.Exe = exePath(e.TGID, e.Exe)
	}
	select {
	case m.events <- e:
		return true
	case <-m.done:
		return false
	}
}

// lostEvent reads the kernel's drop counter and, when it grew since the
// last look, returns a critical EventsLost event saying by how much. The
// kernel drops only while the ring buffer is full, so the records read
// after a drop are enough to notice it: it is checked after every read.
// A drop is reported as critical because the dropped event may have been
// one (a flood of harmless attempts is how an attacker would hide a read
// of the key pages), so --on-alert lock and the key service act on it.
func (m *Monitor) lostEvent() (Event, bool) {
	if m.objs.Drops == nil {
		return Event{}, false
	}
	var per []uint64
	if err := m.objs.Drops.Lookup(uint32(0), &per); err != nil {
		return Event{}, false // Stats reports the failure
	}
	var n uint64
	for _, v := range per {
		n += v
	}
	if n <= m.lastDrops {
		return Event{}, false
	}
	e := Event{Time: time.Now(), KernelNS: MonotonicNow(), Technique: EventsLost, Mode: m.mode, Arg: n - m.lastDrops}
	e.Severity = severityOf(e)
	m.lastDrops = n
	return e, true
}
