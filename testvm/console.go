package testvm

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"sync"
	"time"
)

// ResultMarker starts every line through which the guest reports a result:
// "KEYGATE-RESULT key=value". The key is one word; the value is the rest
// of the line, possibly empty.
const ResultMarker = "KEYGATE-RESULT "

// ParseResult extracts key and value from one console line. The marker may
// follow other output on the same line (the firmware's escape sequences,
// or a kernel message that did not end its line), but the key must be a
// non-empty run of letters, digits, '_', '-' and '.'.
func ParseResult(line string) (key, value string, ok bool) {
	i := strings.Index(line, ResultMarker)
	if i < 0 {
		return "", "", false
	}
	kv := strings.TrimRight(line[i+len(ResultMarker):], "\r")
	key, value, found := strings.Cut(kv, "=")
	if !found || key == "" {
		return "", "", false
	}
	for _, r := range key {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '_' || r == '-' || r == '.') {
			return "", "", false
		}
	}
	return key, value, true
}

// ErrConsoleClosed means the guest's console ended (QEMU exited) before the
// awaited result arrived.
var ErrConsoleClosed = errors.New("guest console closed")

// Console reads a guest's serial console, keeps every line, and collects
// the guest's results. It is safe for concurrent use.
type Console struct {
	start time.Time

	mu      sync.Mutex
	changed chan struct{} // closed and replaced on every new result or EOF
	lines   []string
	results map[string]string
	at      map[string]time.Duration
	eof     error         // non-nil once the console ended
	done    chan struct{} // closed once the console ended
}

// NewConsole starts reading r until EOF, copying each line to echo when it
// is not nil (for watching a guest live).
func NewConsole(r io.Reader, echo io.Writer) *Console {
	c := &Console{start: time.Now(), changed: make(chan struct{}), done: make(chan struct{}), results: map[string]string{}, at: map[string]time.Duration{}}
	go c.read(r, echo)
	return c
}

func (c *Console) read(r io.Reader, echo io.Writer) {
	br := bufio.NewReaderSize(r, 64<<10)
	for {
		line, err := br.ReadString('\n')
		if line != "" {
			line = strings.TrimRight(line, "\r\n")
			if echo != nil {
				fmt.Fprintln(echo, line)
			}
			c.add(line)
		}
		if err != nil {
			if err == io.EOF {
				err = ErrConsoleClosed
			}
			c.mu.Lock()
			c.eof = err
			c.notify()
			c.mu.Unlock()
			close(c.done)
			return
		}
	}
}

func (c *Console) add(line string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.lines = append(c.lines, line)
	if k, v, ok := ParseResult(line); ok {
		c.results[k] = v
		c.at[k] = time.Since(c.start)
		c.notify()
	}
}

func (c *Console) notify() {
	close(c.changed)
	c.changed = make(chan struct{})
}

// Result waits for the guest to report key and returns its value (the
// last one, if the guest reported it more than once). It fails when ctx
// ends or the console closes first, with the console's last lines in the
// error.
func (c *Console) Result(ctx context.Context, key string) (string, error) {
	for {
		c.mu.Lock()
		v, ok := c.results[key]
		eof, changed := c.eof, c.changed
		c.mu.Unlock()
		if ok {
			return v, nil
		}
		if eof != nil {
			return "", fmt.Errorf("wait for guest result %q: %w\n%s", key, eof, c.Tail(30))
		}
		select {
		case <-changed:
		case <-ctx.Done():
			return "", fmt.Errorf("wait for guest result %q: %w\n%s", key, ctx.Err(), c.Tail(30))
		}
	}
}

// Results returns a copy of every result reported so far.
func (c *Console) Results() map[string]string {
	c.mu.Lock()
	defer c.mu.Unlock()
	m := make(map[string]string, len(c.results))
	for k, v := range c.results {
		m[k] = v
	}
	return m
}

// At returns how long after the console started the guest reported key.
func (c *Console) At(key string) (time.Duration, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	d, ok := c.at[key]
	return d, ok
}

// Done returns a channel that is closed once the console has ended.
func (c *Console) Done() <-chan struct{} { return c.done }

// Text returns the whole console output so far.
func (c *Console) Text() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return strings.Join(c.lines, "\n")
}

// Tail returns the last n console lines, for error messages.
func (c *Console) Tail(n int) string {
	c.mu.Lock()
	defer c.mu.Unlock()
	l := c.lines
	if len(l) > n {
		l = l[len(l)-n:]
	}
	return "--- guest console (last lines) ---\n" + strings.Join(l, "\n")
}
