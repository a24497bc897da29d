// Package progress draws a one-line progress bar on a terminal, and nothing
// at all when the output is a file or a pipe, so scripts see clean output.
package progress

import (
	"fmt"
	"io"
	"os"
	"strings"
	"sync"
	"time"

	"golang.org/x/term"
)

// Bar counts bytes towards a known total. The zero-cost form (when the
// output is not a terminal) is a Bar whose methods do nothing.
type Bar struct {
	mu      sync.Mutex
	w       io.Writer
	label   string
	total   int64
	done    int64
	start   time.Time
	last    time.Time
	enabled bool
}

// New returns a bar that draws on f (normally os.Stderr) only when both f
// and standard output are terminals: a person is watching, and no script is
// reading the output. A total of 0 or less means unknown: only bytes and
// rate show.
func New(f *os.File, label string, total int64) *Bar {
	return &Bar{w: f, label: label, total: total, start: time.Now(),
		enabled: f != nil && term.IsTerminal(int(f.Fd())) && term.IsTerminal(int(os.Stdout.Fd()))}
}

// Add records n more bytes done; it redraws at most ten times a second.
func (b *Bar) Add(n int64) {
	if b == nil || !b.enabled {
		return
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	b.done += n
	if now := time.Now(); now.Sub(b.last) >= 100*time.Millisecond {
		b.last = now
		b.draw()
	}
}

// Write lets a Bar sit in an io.MultiWriter or io.TeeReader.
func (b *Bar) Write(p []byte) (int, error) { b.Add(int64(len(p))); return len(p), nil }

// Done draws the final state and ends the line.
func (b *Bar) Done() {
	if b == nil || !b.enabled {
		return
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	b.draw()
	fmt.Fprintln(b.w)
}

func (b *Bar) draw() {
	secs := time.Since(b.start).Seconds()
	rate := 0.0
	if secs > 0 {
		rate = float64(b.done) / secs
	}
	if b.total <= 0 {
		fmt.Fprintf(b.w, "\r%s %s  %s/s ", b.label, Bytes(b.done), Bytes(int64(rate)))
		return
	}
	const width = 30
	frac := float64(b.done) / float64(b.total)
	if frac > 1 {
		frac = 1
	}
	n := int(frac * width)
	fmt.Fprintf(b.w, "\r%s [%s%s] %3.0f%% %s/%s  %s/s ", b.label,
		strings.Repeat("=", n), strings.Repeat(" ", width-n), frac*100,
		Bytes(b.done), Bytes(b.total), Bytes(int64(rate)))
}

// Bytes formats n with a binary unit, for humans.
func Bytes(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}
