// Package keysvc is keygate's on-premises key service as a library: the VM
// API (challenge, unlock, provision, session, events, credential
// activation), the admin API (VMs, volumes, policies, revoke, erase, audit,
// the events VMs reported), Prometheus metrics, and the bootstrap of a data
// directory (master key, CA, server certificate, admin token) with two TLS
// 1.3 listeners.
//
// A VM unlocks a volume in two round trips (docs/protocol.md is the wire
// contract):
//
//  1. POST /v1/challenge: the service checks that the VM is enrolled with the
//     EK (and AK) it presents and returns a stateless challenge token and a
//     nonce (package attest).
//  2. POST /v1/unlock: the service checks the token, verifies the quote with attest.Verify against the
//     VM's enrolled AK and policy, and answers with the volume's unwrap key
//     sealed by package tpm/importblob to the VM's EK and to the PCR values
//     the quote proved; only that TPM, in that state, can import it. The
//     token's use is recorded with the audit record of the outcome, in one
//     transaction, so even a failed attempt uses it up and an unlock waits
//     for one durable write.
//
// What it owns: HTTP handlers, request decoding and the enforcement of the
// limits, the order of checks, learn mode's switch, session tokens, metrics
// and the data directory's TLS material. What it does not own: the wire
// types and their limits (keysvc/api, shared with keysvc/client, the one
// client of both APIs), challenge tokens, quote
// verification and policies (package attest), persistence (the Store seam,
// implemented by keysvc/store), the audit chain's cryptography (keysvc/audit)
// and the master key (keysvc/masterkey).
//
// Dependencies are injected with Options (WithStore, WithAudit,
// WithMasterKey, WithAdminToken, WithChallenger, WithClock, WithLogger,
// WithRateLimits, WithEKRoots, WithEventRetention) through narrow interfaces
// (Store, Auditor, MasterKey); Start wires the defaults for a data directory (Bootstrap, keysvc/store's
// SQLite, keysvc/audit, keysvc/masterkey). Nothing here logs or audits a
// secret: unwrap keys, tokens and import blobs are named by fingerprints or
// IDs only. A key is released only after its release was appended to the
// audit chain.
//
// Not yet here: PostgreSQL, mTLS admin clients, and UK rotation.
package keysvc
