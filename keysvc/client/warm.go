package client

import (
	"context"
	"crypto/tls"
	"net"
	"time"
)

// preDialed is the outcome of Warm's dial.
type preDialed struct {
	conn net.Conn
	err  error
	at   time.Time // when the handshake ended
}

// warmMaxAge is how long a warm connection may wait for its first request.
// The key service (as any Go server) drops a connection that sends nothing
// for 10 s after its handshake, and a hardware TPM can take that long to
// make an RSA EK; an older connection is closed and a fresh one dialed, so
// that the request never meets a dead connection.
var warmMaxAge = 5 * time.Second

// Warm starts the TCP connect and TLS handshake to the replica tried first
// in the background, so that it overlaps other work (the TPM's key
// creation); the first request to that replica takes the connection over.
// It sends nothing but the handshake, which checks the certificate as any
// other does.
func (c *Client) Warm() {
	r := c.reps[c.cur.Load()]
	ctx, cancel := context.WithCancel(context.Background())
	ch := make(chan preDialed, 1)
	r.mu.Lock()
	old, oldCancel := r.pre, r.preCancel
	r.pre, r.preCancel = ch, cancel
	r.mu.Unlock()
	if old != nil {
		oldCancel()
		go closePre(old)
	}
	go func() {
		conn, err := r.dial(ctx, "tcp", r.addr)
		ch <- preDialed{conn, err, time.Now()}
	}()
}

// dialTLS is the transport's dialer: the warm connection if there is one
// and it came up. When the warm dial failed, a lone replica dials again
// (the service may have come up meanwhile); one of several returns the
// failure, so that the client moves on to the next replica at once.
func (r *replica) dialTLS(ctx context.Context, network, addr string) (net.Conn, error) {
	r.mu.Lock()
	ch, cancel := r.pre, r.preCancel
	if addr != r.addr {
		ch = nil
	}
	if ch != nil {
		r.pre, r.preCancel = nil, nil
	}
	r.mu.Unlock()
	if ch != nil {
		select {
		case p := <-ch:
			cancel()
			if p.err == nil && time.Since(p.at) < warmMaxAge {
				return p.conn, nil
			}
			if p.conn != nil {
				p.conn.Close()
			}
			if p.err != nil && len(r.c.reps) > 1 {
				return nil, p.err
			}
		case <-ctx.Done():
			cancel()
			go closePre(ch)
			return nil, ctx.Err()
		}
	}
	return r.dial(ctx, network, addr)
}

// dial connects and shakes hands within the client's current connect
// bound.
func (r *replica) dial(ctx context.Context, network, addr string) (net.Conn, error) {
	ctx, cancel := context.WithTimeout(ctx, time.Duration(r.c.dialTO.Load()))
	defer cancel()
	d := tls.Dialer{Config: r.conf}
	return d.DialContext(ctx, network, addr)
}

// closePre closes the warm connection once its dial ends.
func closePre(ch chan preDialed) {
	if p := <-ch; p.conn != nil {
		p.conn.Close()
	}
}

func (r *replica) close() {
	r.mu.Lock()
	ch, cancel := r.pre, r.preCancel
	r.pre, r.preCancel = nil, nil
	r.mu.Unlock()
	if ch != nil {
		cancel()
		go closePre(ch)
	}
	r.hc.CloseIdleConnections()
}
