package attest

import (
	"bytes"
	"crypto"
	"encoding/hex"
	"errors"
	"fmt"
	"slices"

	pb "github.com/google/go-tpm-tools/proto/attest"
	tpmpb "github.com/google/go-tpm-tools/proto/tpm"
	"github.com/google/go-tpm-tools/server"
	"github.com/google/go-tpm/legacy/tpm2"
)

var (
	// ErrEvidence: the attestation is not genuine, fresh evidence from an
	// enrolled AK (bad signature, wrong nonce, altered quote or PCR values,
	// an event log that does not replay, or not a quote at all).
	ErrEvidence = errors.New("attestation evidence invalid")
	// ErrQualifyingData: the quote qualifies other data than the nonce
	// given (it also matches ErrEvidence): a quote for another challenge,
	// or, for keysvc, a VM that trusts another CA (api.QuoteData).
	ErrQualifyingData = errors.New("the quote is not over this challenge's nonce")
	// ErrUntrustedAK: the attestation was made by an AK that is not enrolled
	// for this VM. It also matches ErrEvidence.
	ErrUntrustedAK = errors.New("attestation key not enrolled for this VM")
)

// VerifyOpts says what Verify checks an attestation against.
type VerifyOpts struct {
	// Nonce is the nonce of the redeemed challenge (Claims.Nonce); the quote
	// must carry it as qualifying data.
	Nonce []byte
	// TrustedAKs are the VM's enrolled attestation keys.
	TrustedAKs []crypto.PublicKey
	// Policy is the VM's policy. Verify requires at least one PCR in it;
	// Learn uses only its event-log rules.
	Policy *Policy
}

// Result is what Verify and Learn return once every check passed.
type Result struct {
	// PCRs are the SHA-256 PCR values of the verified quote, by index.
	PCRs map[int][]byte
	// MachineState is go-tpm-tools' reading of the verified event log (empty
	// when the attestation carries no log).
	MachineState *pb.MachineState
	// AK is the enrolled key that signed the quote.
	AK crypto.PublicKey
}

// Verify checks a VM's attestation and returns a Result only if every
// check passed. It never touches a TPM. In order, it checks:
//
//  1. the options: a nonce, at least one enrolled AK, a valid policy;
//  2. the attestation's AK public area decodes to one of TrustedAKs
//     (else ErrUntrustedAK);
//  3. the attestation holds exactly one SHA-256 quote (an ambiguous or
//     missing SHA-256 bank is refused, so "the verified quote" is one thing);
//  4. server.VerifyAttestation, pinned to that AK and the SHA-256 bank:
//     the quote's signature by the AK, TPM_GENERATED magic, quote structure,
//     the PCR selection and values against the signed digest, the nonce as
//     qualifying data, and the replay of the event log (if any) against the
//     quoted PCRs (failures: ErrEvidence);
//  5. the policy has at least one PCR, and every policy PCR is covered by
//     the verified quote and equals one of its allowed values; a PCR absent
//     from the quote fails (event-log replay only covers PCRs that have
//     events, so this comparison is explicit);
//  6. the policy's event-log rules (Secure Boot, kernel command line) hold
//     in the verified MachineState; a rule fails when the attestation
//     carries no UEFI event log.
//
// Failures of 5 and 6 are reported together in one *Denial, which matches
// ErrPolicyDenied and names every failing PCR (allowed values and the value
// got) and rule.
func Verify(att *pb.Attestation, opts VerifyOpts) (*Result, error) {
	if opts.Policy == nil {
		return nil, errors.New("verify attestation: no policy given")
	}
	res, err := verifyEvidence(att, opts)
	if err != nil {
		return nil, err
	}
	rules := evalRules(opts.Policy, att, res.MachineState)
	if len(opts.Policy.PCRs) == 0 {
		d := newDenial(nil, rules)
		d.Reason = joinReason("the policy has no PCR values; set them with `keysvc policy set` or capture them with `keysvc policy learn`", d.Reason)
		return nil, d
	}
	mm := evalPCRs(opts.Policy, res.PCRs)
	if len(mm) > 0 || len(rules) > 0 {
		return nil, newDenial(mm, rules)
	}
	return res, nil
}

// BootPCRs are the PCRs UEFI firmware, shim, boot loaders and the Linux EFI
// stub measure the boot chain into (0-9, 14): a sensible selection for
// Learn. PCRs 16 and 23 (resettable) and 10-13 (OS runtime) are left out
// because their values are not a property of the boot.
var BootPCRs = []int{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 14}

// Learn is learn mode: it runs every check of Verify except the PCR
// comparison (steps 1-4 and 6; opts.Policy may be nil or hold only rules)
// and returns the policy captured from the verified quote: the quoted value
// of each PCR in pcrs (e.g. BootPCRs; every quoted PCR when pcrs is nil),
// plus the event-log rules of opts.Policy. The caller stores it and audits
// the capture.
func Learn(att *pb.Attestation, opts VerifyOpts, pcrs []int) (*Policy, *Result, error) {
	if pcrs != nil && len(pcrs) == 0 {
		return nil, nil, errors.New("learn policy: no PCRs selected; name at least one, or pass nil for every quoted PCR")
	}
	res, err := verifyEvidence(att, opts)
	if err != nil {
		return nil, nil, err
	}
	learned := &Policy{PCRs: make(map[int][][]byte)}
	if opts.Policy != nil {
		if sb := opts.Policy.SecureBoot; sb != nil {
			learned.SecureBoot = new(bool)
			*learned.SecureBoot = *sb
		}
		if r := opts.Policy.KernelCmdline; r != nil {
			learned.KernelCmdline = &CmdlineRule{Equals: r.Equals, Contains: slices.Clone(r.Contains)}
		}
		if rules := evalRules(opts.Policy, att, res.MachineState); len(rules) > 0 {
			return nil, nil, newDenial(nil, rules)
		}
	}
	if pcrs == nil {
		pcrs = sortedPCRs(res.PCRs)
	}
	for _, i := range pcrs {
		v, ok := res.PCRs[i]
		if !ok {
			return nil, nil, fmt.Errorf("learn policy: PCR %d is not in the verified quote; learn only quoted PCRs", i)
		}
		learned.PCRs[i] = [][]byte{slices.Clone(v)}
	}
	if err := learned.Validate(); err != nil {
		return nil, nil, fmt.Errorf("learn policy: %w", err)
	}
	return learned, res, nil
}

// verifyEvidence performs steps 1-4 of Verify.
func verifyEvidence(att *pb.Attestation, opts VerifyOpts) (*Result, error) {
	if att == nil {
		return nil, fmt.Errorf("%w: no attestation", ErrEvidence)
	}
	if len(opts.Nonce) == 0 {
		return nil, errors.New("verify attestation: no nonce given (pass the redeemed challenge's nonce)")
	}
	if len(opts.TrustedAKs) == 0 {
		return nil, errors.New("verify attestation: no enrolled AK given (enroll one with `keysvc vm enroll --ak-pub`)")
	}
	if opts.Policy != nil {
		if err := opts.Policy.Validate(); err != nil {
			return nil, fmt.Errorf("verify attestation: invalid policy: %w", err)
		}
	}

	ak, err := matchAK(att.GetAkPub(), opts.TrustedAKs)
	if err != nil {
		return nil, err
	}

	var quote *tpmpb.Quote
	n := 0
	for _, q := range att.GetQuotes() {
		if q.GetPcrs().GetHash() == tpmpb.HashAlgo_SHA256 {
			if quote == nil {
				quote = q
			}
			n++
		}
	}
	if n != 1 {
		return nil, fmt.Errorf("%w: attestation holds %d SHA-256 quotes, want exactly 1", ErrEvidence, n)
	}

	ms, err := verifyAttestation(att, server.VerifyOpts{
		Nonce:      opts.Nonce,
		TrustedAKs: []crypto.PublicKey{ak},
		HashAlgo:   tpm2.AlgSHA256,
		Loader:     server.UnsupportedLoader,
		// OVMF's direct kernel boot (QEMU -kernel, the test VM) measures
		// the kernel into PCR 4 before the "Calling EFI Application" event.
		// The order of log events is not what the policy trusts: every
		// policy PCR is compared with the quote below.
		AllowEFIAppBeforeCallingEvent: true,
	})
	if err != nil {
		// Say plainly when the quote is simply not over this nonce: the
		// likeliest cause is a VM that trusts another CA (keysvc binds the
		// CA into the nonce), which the operator can check and fix.
		if ad, derr := tpm2.DecodeAttestationData(quote.GetQuote()); derr == nil && !bytes.Equal(ad.ExtraData, opts.Nonce) {
			return nil, fmt.Errorf("%w: %w", ErrEvidence, ErrQualifyingData)
		}
		return nil, fmt.Errorf("%w: %v", ErrEvidence, err)
	}
	if ms.GetHash() != tpmpb.HashAlgo_SHA256 && len(att.GetEventLog()) > 0 {
		return nil, fmt.Errorf("%w: event log verified with %v, want SHA256", ErrEvidence, ms.GetHash())
	}

	pcrs := make(map[int][]byte, len(quote.GetPcrs().GetPcrs()))
	for i, v := range quote.GetPcrs().GetPcrs() {
		if i >= NumPCRs || len(v) != PCRSize {
			return nil, fmt.Errorf("%w: quoted PCR %d has a %d-byte value", ErrEvidence, i, len(v))
		}
		pcrs[int(i)] = slices.Clone(v)
	}
	return &Result{PCRs: pcrs, MachineState: ms, AK: ak}, nil
}

// verifyAttestation is server.VerifyAttestation, with a panic turned into
// an error. go-eventlog (as of the version go-tpm-tools v0.4.10 pins)
// panics on some event types it does not know; an event's type is not
// covered by the PCRs, so a VM can send such a log with a genuine quote.
// Without this, one request could stop the key service.
func verifyAttestation(att *pb.Attestation, opts server.VerifyOpts) (ms *pb.MachineState, err error) {
	defer func() {
		if r := recover(); r != nil {
			ms, err = nil, fmt.Errorf("event log parser failed: %v", r)
		}
	}()
	return server.VerifyAttestation(att, opts)
}

// matchAK decodes the attestation's AK public area and returns the enrolled
// key it equals.
func matchAK(akPub []byte, trusted []crypto.PublicKey) (crypto.PublicKey, error) {
	pub, err := tpm2.DecodePublic(akPub)
	if err != nil {
		return nil, fmt.Errorf("%w: decode AK public area: %v", ErrEvidence, err)
	}
	key, err := pub.Key()
	if err != nil {
		return nil, fmt.Errorf("%w: AK public key: %v", ErrEvidence, err)
	}
	got, err := KeyFingerprint(key)
	if err != nil {
		return nil, fmt.Errorf("%w: AK public key: %v", ErrEvidence, err)
	}
	for _, t := range trusted {
		want, err := KeyFingerprint(t)
		if err == nil && want == got {
			return t, nil
		}
	}
	return nil, fmt.Errorf("%w: %w: AK %x is not among the %d enrolled; enroll it, or check the VM uses its enrolled AK",
		ErrEvidence, ErrUntrustedAK, got[:8], len(trusted))
}

// evalPCRs compares every policy PCR with the quoted values.
func evalPCRs(p *Policy, quoted map[int][]byte) []PCRMismatch {
	var mm []PCRMismatch
	for _, i := range sortedPCRs(p.PCRs) {
		allowed := p.PCRs[i]
		got, ok := quoted[i]
		if ok && slices.ContainsFunc(allowed, func(a []byte) bool { return bytes.Equal(a, got) }) {
			continue
		}
		m := PCRMismatch{PCR: i, Allowed: make([]string, len(allowed)), Missing: !ok}
		for j, a := range allowed {
			m.Allowed[j] = hex.EncodeToString(a)
		}
		if ok {
			m.Got = hex.EncodeToString(got)
		}
		mm = append(mm, m)
	}
	return mm
}

func joinReason(a, b string) string {
	if b == "" {
		return a
	}
	return a + "; " + b
}
