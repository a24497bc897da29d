// Package attest decides whether a VM's vTPM evidence earns it a key.
//
// It owns three things, all pure computation on bytes and keys:
//
//   - Challenge tokens (Challenger): stateless, HMAC-SHA256'd, time-limited
//     tokens bound to a VM, a volume, the VM's EK and AK, and a fresh nonce.
//     Any key service replica holding the MAC key can check one; a
//     ReplayCache, backed by the key service's store, makes each single-use.
//   - Verification (Verify, Learn): a go-tpm-tools Attestation is checked
//     against the challenge nonce, the enrolled AK and a Policy. The verifier
//     returns a Result only after every check passed; a genuine attestation
//     of a boot the policy does not allow yields a *Denial that names every
//     failing PCR and event-log rule.
//   - Policies (Policy, ParsePolicy): sets of allowed SHA-256 PCR values,
//     plus optional event-log rules (Secure Boot, kernel command line), with
//     their JSON form.
//
// It does not own TPM access (package tpm makes the EK, AK and quotes on
// the VM), nor storage, HTTP, audit or the learn-mode switch (package
// keysvc decides when to call Learn, stores what it returns and records
// it). Nothing here opens a TPM, a file or a socket.
//
// The flow, as the key service runs it:
//
//	nonce, token, _ := ch.Issue(vm, volume, ekPub, akPub)      // POST /v1/challenge
//	claims, err := ch.Redeem(token, vm, volume, ekPub, akPub, time.Now()) // POST /v1/unlock
//	res, err := attest.Verify(att, attest.VerifyOpts{Nonce: claims.Nonce, TrustedAKs: aks, Policy: pol})
//	var d *attest.Denial; errors.As(err, &d) // 403 body
package attest
