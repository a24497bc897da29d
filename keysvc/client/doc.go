// Package client is the one HTTP client of the key service, for both of its
// APIs: the VM API (challenge, unlock, provision, session, events,
// activate) that a booting VM calls, and the admin API (/v1/admin/…) that
// operators' tools call. It speaks the wire types of keysvc/api and never
// imports the server, so that the VM side carries no store and no SQLite.
//
// What it owns:
//
//   - TLS 1.3 pinned to the service's CA: the CA certificate itself, or
//     only its SHA-256 (a keygate token's pin), in which case the CA is
//     taken from the chain the server sends, but only the one whose hash is
//     pinned, and it must sign the leaf.
//   - One decoding of the service's answers into typed errors: *Refusal
//     for a 403 (errors.Is ErrRefused; final), *Error for any other status
//     (status, code, message, hint, Retry-After), *UnreachableError when no
//     replica gave an answer worth keeping, ErrTLS when every replica
//     failed the CA check.
//   - Failover across several base URLs (replicas of one service). A
//     replica that is dead or unwell (connection refused, connect or TLS
//     handshake timeout, handshake failure, reset, 5xx) costs at most the
//     connect timeout (DefaultConnectTimeout with several URLs) and the next
//     one is tried; an answer (200, or a 4xx such as a denial) from a
//     replica is final and is never shopped around to the others. The
//     replica that answered last is tried first next time. docs/protocol.md
//     states these rules.
//
// It does not retry over time: a caller that wants to wait for the service
// (keygate boot does) loops on *UnreachableError with its own backoff,
// honouring RetryAfter.
package client
