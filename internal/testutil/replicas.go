package testutil

import (
	"crypto/tls"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"testing"
)

// Stand-ins for key service replicas that are down or unwell, for the
// failover tests and benchmarks of keysvc/client and boot. Each is a real
// socket on loopback, closed when the test ends.

// ClosedPort returns an https URL on which nothing listens: connection
// refused.
func ClosedPort(t testing.TB) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return "https://" + addr
}

// BlackHole returns an https URL whose listener accepts connections and
// never says a word: a hung replica, or a firewall that lets the SYN
// through. A TLS handshake with it never ends.
func BlackHole(t testing.TB) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var conns []net.Conn
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		for _, c := range conns {
			c.Close()
		}
		mu.Unlock()
	})
	return "https://" + ln.Addr().String()
}

// Fixed is a TLS server that answers every request with one status and an
// ErrorBody-shaped JSON body, and counts the requests.
type Fixed struct {
	URL      string
	requests atomic.Int32
}

// Requests is how many requests reached it.
func (f *Fixed) Requests() int32 { return f.requests.Load() }

// FixedServer starts a Fixed with cert (the key service's own server
// certificate makes it a replica the client trusts). retryAfter, when
// set, is sent as Retry-After.
func FixedServer(t testing.TB, cert tls.Certificate, status int, retryAfter string) *Fixed {
	t.Helper()
	ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS13})
	if err != nil {
		t.Fatal(err)
	}
	f := &Fixed{URL: "https://" + ln.Addr().String()}
	srv := &http.Server{ErrorLog: log.New(io.Discard, "", 0), Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		f.requests.Add(1)
		if retryAfter != "" {
			w.Header().Set("Retry-After", retryAfter)
		}
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(status)
		fmt.Fprintf(w, `{"error":"fixed answer %d","hint":"from a test server"}`, status)
	})}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return f
}
