package ebpfmon

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

func TestNormalize(t *testing.T) {
	many := make([]Range, 0, 70)
	for i := uint64(0); i < 70; i++ {
		many = append(many, Range{i * 0x10000, i*0x10000 + 0x1000})
	}
	tests := []struct {
		name string
		in   []Range
		max  int
		want []Range
	}{
		{"empty", nil, 4, []Range{}},
		{"drops empty ranges", []Range{{5, 5}, {9, 3}, {1, 2}}, 4, []Range{{1, 2}}},
		{"sorts and merges overlapping", []Range{{10, 20}, {0, 5}, {15, 30}}, 4, []Range{{0, 5}, {10, 30}}},
		{"merges adjacent", []Range{{0, 10}, {10, 20}}, 4, []Range{{0, 20}}},
		{"merges the smallest gap first", []Range{{0, 10}, {100, 110}, {112, 120}, {500, 510}}, 3, []Range{{0, 10}, {100, 120}, {500, 510}}},
		{"down to one", []Range{{0, 10}, {100, 110}, {500, 510}}, 1, []Range{{0, 510}}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got := normalize(tc.in, tc.max)
			if len(got) != len(tc.want) {
				t.Fatalf("got %v, want %v", got, tc.want)
			}
			for i := range got {
				if got[i] != tc.want[i] {
					t.Fatalf("got %v, want %v", got, tc.want)
				}
			}
		})
	}
	t.Run("more than MaxRanges still cover every input", func(t *testing.T) {
		got := normalize(many, MaxRanges)
		if len(got) != MaxRanges {
			t.Fatalf("%d ranges, want %d", len(got), MaxRanges)
		}
		for _, r := range many {
			covered := false
			for _, g := range got {
				covered = covered || (g.Start <= r.Start && r.End <= g.End)
			}
			if !covered {
				t.Errorf("%v is no longer covered", r)
			}
		}
	})
}

func TestParseRangeLine(t *testing.T) {
	tests := []struct {
		line    string
		want    RangeUpdate
		ok      bool
		wantErr string
	}{
		{"7f00-7f10", RangeUpdate{Range: Range{0x7f00, 0x7f10}}, true, ""},
		{"+0x1000-0x2000  # key 1", RangeUpdate{Range: Range{0x1000, 0x2000}}, true, ""},
		{"-1000-2000", RangeUpdate{Remove: true, Range: Range{0x1000, 0x2000}}, true, ""},
		{"   ", RangeUpdate{}, false, ""},
		{"# only a comment", RangeUpdate{}, false, ""},
		{"1000", RangeUpdate{}, false, "START-END"},
		{"xyz-2000", RangeUpdate{}, false, "hex"},
		{"2000-1000", RangeUpdate{}, false, "above START"},
		{"1000-1000", RangeUpdate{}, false, "above START"},
	}
	for _, tc := range tests {
		t.Run(tc.line, func(t *testing.T) {
			got, ok, err := ParseRangeLine(tc.line)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("error %v, want one saying %q", err, tc.wantErr)
				}
				return
			}
			if err != nil || ok != tc.ok || got != tc.want {
				t.Fatalf("got %+v %v %v, want %+v %v", got, ok, err, tc.want, tc.ok)
			}
		})
	}
}

func TestReadRanges(t *testing.T) {
	var got []RangeUpdate
	err := ReadRanges(strings.NewReader("1000-2000\n# c\n-1000-2000\n"), func(u RangeUpdate) error { got = append(got, u); return nil })
	if err != nil || len(got) != 2 || !got[1].Remove {
		t.Fatalf("got %+v, %v", got, err)
	}
	err = ReadRanges(strings.NewReader("1000-2000\nbad\n"), func(RangeUpdate) error { return nil })
	if err == nil || !strings.Contains(err.Error(), "line 2") {
		t.Errorf("error %v, want one naming line 2", err)
	}
	stop := errors.New("stop")
	if err := ReadRanges(strings.NewReader("1000-2000\n"), func(RangeUpdate) error { return stop }); !errors.Is(err, stop) {
		t.Errorf("error %v, want the callback's", err)
	}
}

func record(t testing.TB, raw monitorEvent) []byte {
	b, err := binary.Append(nil, binary.NativeEndian, raw)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestDecodeRecord(t *testing.T) {
	raw := monitorEvent{Ktime: 5e9, Pid: 11, Tgid: 10, Uid: 1000, Target: 43, TargetTgid: 42,
		Technique: 1, Flags: flagOverlap, Addr: 0x1000, Len: 64, Overlap: 64, Total: 64, Niov: 1, Result: 64}
	copy(raw.Comm[:], []int8{'g', 'd', 'b'})
	good := record(t, raw)
	tests := []struct {
		name    string
		b       []byte
		wantErr string
	}{
		{"good", good, ""},
		{"short", good[:len(good)-1], "stale"},
		{"unknown technique", record(t, monitorEvent{Technique: 99}), "does not know"},
		{"no technique", record(t, monitorEvent{}), "does not know"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := decodeRecord(tc.b)
			if tc.wantErr == "" && err != nil || tc.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tc.wantErr)) {
				t.Fatalf("error %v, want %q", err, tc.wantErr)
			}
		})
	}
	got, _ := decodeRecord(good)
	boot := time.Unix(1000, 0)
	e := toEvent(got, boot, ModeDetect)
	want := Event{Time: boot.Add(5 * time.Second), KernelNS: 5e9, PID: 11, TGID: 10, Comm: "gdb", UID: 1000,
		Technique: ProcessVMReadv, Severity: Critical, Mode: ModeDetect, Target: 43, TargetPID: 42,
		Addr: 0x1000, Len: 64, Bytes: 64, OverlapBytes: 64, Overlap: true, Ranges: 1, Result: 64}
	if e != want {
		t.Errorf("event\n%+v\nwant\n%+v", e, want)
	}
}

// TestDenied checks that Denied comes from the BPF LSM's own record (the
// F_DENIED flag), never from the errno: the kernel hands the caller EACCES
// for a refused open of /proc/<pid>/mem, and its own checks return EPERM.
func TestDenied(t *testing.T) {
	const eperm, eacces = -1, -13
	tests := []struct {
		name   string
		tech   uint32
		flags  uint32
		result int64
		mode   Mode
		want   bool
	}{
		{"flag with EPERM", 1, flagOverlap | flagDenied, eperm, ModeDeny, true},
		{"flag with EACCES from mm_access", 7, flagOverlap | flagResolved | flagDenied, eacces, ModeDeny, true},
		{"EPERM from the kernel's own checks", 3, 0, eperm, ModeDeny, false},
		{"EACCES without the flag", 7, flagOverlap, eacces, ModeDeny, false},
		{"EPERM in detect mode", 1, flagOverlap, eperm, ModeDetect, false},
		{"success", 1, flagOverlap, 64, ModeDeny, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			raw, err := decodeRecord(record(t, monitorEvent{Technique: tc.tech, Flags: tc.flags, Result: tc.result}))
			if err != nil {
				t.Fatal(err)
			}
			e := toEvent(raw, time.Unix(0, 0), tc.mode)
			if e.Denied != tc.want {
				t.Errorf("flags %#x result %d mode %s: Denied %v, want %v", tc.flags, tc.result, tc.mode, e.Denied, tc.want)
			}
			if e.Result != tc.result {
				t.Errorf("Result %d, want %d", e.Result, tc.result)
			}
			b, err := json.Marshal(e)
			if err != nil {
				t.Fatal(err)
			}
			if got := bytes.Contains(b, []byte(`"denied":true`)); got != tc.want {
				t.Errorf("JSON %s: \"denied\":true present %v, want %v", b, got, tc.want)
			}
		})
	}
}

func FuzzDecodeRecord(f *testing.F) {
	f.Add(record(f, monitorEvent{Technique: 7, Path: [64]int8{'/', 'p'}}))
	f.Add([]byte{1, 2, 3})
	f.Fuzz(func(t *testing.T, b []byte) {
		raw, err := decodeRecord(b)
		if err != nil {
			return
		}
		e := toEvent(raw, time.Unix(0, 0), ModeDetect)
		if e.Technique == "" || e.Severity == "" {
			t.Fatalf("decoded %+v without technique or severity", e)
		}
		if _, err := json.Marshal(e); err != nil {
			t.Fatal(err)
		}
	})
}

func TestSeverity(t *testing.T) {
	tests := []struct {
		e    Event
		want Severity
	}{
		{Event{Technique: ProcessVMReadv, Overlap: true}, Critical},
		{Event{Technique: ProcessVMReadv}, Warning},
		{Event{Technique: ProcessVMReadv, Mode: ModeDetect, Result: 64}, Critical}, // ranges may have been swapped mid-call
		{Event{Technique: ProcessVMWritev, Mode: ModeDetect, Result: 8}, Critical},
		{Event{Technique: ProcessVMReadv, Mode: ModeDetect, Result: -14}, Warning},
		{Event{Technique: ProcessVMReadv, Mode: ModeDeny, Result: 0}, Warning}, // judged in the kernel's check
		{Event{Technique: ProcessVMWritev, Truncated: true}, Critical},
		{Event{Technique: PtracePeek}, Warning},
		{Event{Technique: PtracePoke, Overlap: true}, Critical},
		{Event{Technique: PtraceAttach}, Critical},
		{Event{Technique: PtraceSeize}, Critical},
		{Event{Technique: ProcMem}, Critical},
		{Event{Technique: ProcEnviron}, Info},
		{Event{Technique: ProcMaps}, Info},
		{Event{Technique: PidfdGetfd}, Critical},
		{Event{Technique: PerfEventOpen}, Warning},
		{Event{Technique: PerfEventOpen, Scope: "cpu", SampleType: 1 << 13}, Warning},
		{Event{Technique: PerfEventOpen, Scope: "cgroup", SampleType: 1 << 12}, Warning},
		{Event{Technique: PerfEventOpen, Scope: "cpu", SampleType: 1 << 10}, Info}, // PERF_SAMPLE_RAW: a BPF tool attaching
		{Event{Technique: ProcessVMReadv, IovChanged: true}, Critical},
		{Event{Technique: ProcessVMReadv, IovUnread: true, Result: 64}, Critical},
		{Event{Technique: ProcessVMReadv, IovUnread: true, Result: -1}, Warning},
		{Event{Technique: Kcore}, Critical},
		{Event{Technique: DevMem}, Critical},
		{Event{Technique: EventsLost, Arg: 1}, Critical},
		{Event{Technique: BPFFD}, Critical},
		{Event{Technique: BPFProgLoad, Arg: 5}, Warning},
	}
	for _, tc := range tests {
		t.Run(string(tc.e.Technique), func(t *testing.T) {
			if got := severityOf(tc.e); got != tc.want {
				t.Errorf("%s (overlap %v): %s, want %s", tc.e.Technique, tc.e.Overlap, got, tc.want)
			}
		})
	}
	if len(Techniques()) != len(techniques) { // the kernel's, and EventsLost
		t.Error("Techniques() misses some")
	}
}

func TestSinks(t *testing.T) {
	events := []Event{
		{Technique: ProcMaps, Severity: Info, TGID: 1},
		{Technique: ProcessVMReadv, Severity: Warning, TGID: 2},
		{Technique: ProcMem, Severity: Critical, TGID: 3, Path: "/proc/9/mem"},
		{Technique: PtraceAttach, Severity: Critical, TGID: 4},
	}
	var buf bytes.Buffer
	reg := prometheus.NewRegistry()
	mt, err := NewMetrics(reg, nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := NewMetrics(reg, nil); err == nil {
		t.Error("registering the metrics twice succeeded")
	}
	var alerts []Event
	failing := SinkFunc(func(Event) error { return errors.New("full") })
	var sinkErrs int
	ch := make(chan Event, len(events))
	for _, e := range events {
		ch <- e
	}
	close(ch)
	Dispatch(context.Background(), ch, func(Sink, error) { sinkErrs++ },
		NewJSONSink(&buf), mt, OnAlert(Critical, func(e Event) { alerts = append(alerts, e) }), failing)

	lines := strings.Split(strings.TrimSpace(buf.String()), "\n")
	if len(lines) != len(events) {
		t.Fatalf("%d JSON lines, want %d", len(lines), len(events))
	}
	var back Event
	if err := json.Unmarshal([]byte(lines[2]), &back); err != nil || back.Path != "/proc/9/mem" || back.Technique != ProcMem {
		t.Errorf("JSON line %s decodes to %+v (%v)", lines[2], back, err)
	}
	series := gather(t, reg, "keygate_monitor_events_total")
	if got := series["critical/proc_mem"]; got != 1 {
		t.Errorf("proc_mem/critical counter %v, want 1", got)
	}
	if got, ok := series["critical/kcore"]; !ok || got != 0 {
		t.Errorf("kcore/critical counter %v (present %v), want a zero", got, ok)
	}
	if len(series) != len(Techniques())*len(Severities()) {
		t.Errorf("%d series, want every technique and severity pre-set", len(series))
	}
	if len(alerts) != 1 || alerts[0].TGID != 3 {
		t.Errorf("on-alert hook saw %+v, want only the first critical event", alerts)
	}
	if sinkErrs != len(events) {
		t.Errorf("%d sink errors reported, want %d", sinkErrs, len(events))
	}
}

// gather returns the counters named name from reg, keyed by their label
// values (sorted by label name) joined with "/".
func gather(t testing.TB, reg *prometheus.Registry, name string) map[string]float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]float64{}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			var vals []string
			for _, l := range m.GetLabel() {
				vals = append(vals, l.GetValue())
			}
			out[strings.Join(vals, "/")] = m.GetCounter().GetValue()
		}
	}
	return out
}

// FuzzParseRangeLine checks that any line either fails cleanly or parses to
// a range that prints back to a line parsing to the same update.
func FuzzParseRangeLine(f *testing.F) {
	for _, s := range []string{"7f00-7f10", "+0x1000-0x2000 # k", "-1000-2000", "", "#", "a-", "-", "ffffffffffffffff-0"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, line string) {
		u, ok, err := ParseRangeLine(line)
		if err != nil || !ok {
			return
		}
		if u.Range.End <= u.Range.Start {
			t.Fatalf("%q parsed to the empty range %v", line, u.Range)
		}
		again := u.Range.String()
		if u.Remove {
			again = "-" + again
		}
		u2, ok2, err2 := ParseRangeLine(again)
		if err2 != nil || !ok2 || u2 != u {
			t.Fatalf("%q -> %+v -> %q -> %+v (%v)", line, u, again, u2, err2)
		}
	})
}
