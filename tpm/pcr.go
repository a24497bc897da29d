package tpm

import (
	"crypto"
	_ "crypto/sha1" // SHA-1 PCR banks are extended too
	"crypto/sha256"
	_ "crypto/sha512" // SHA-384 and SHA-512 banks
	"errors"
	"fmt"
	"os"
	"slices"

	"github.com/google/go-tpm-tools/client"
	tpmpb "github.com/google/go-tpm-tools/proto/tpm"
	"github.com/google/go-tpm/legacy/tpm2"
	"github.com/google/go-tpm/tpmutil"
)

// NumPCRs is the number of PCRs a PC-client TPM has in each bank (0-23).
const NumPCRs = client.NumPCRs

// WindowPCR is the PCR keygate extends right after a successful unlock, to
// "close the window": an import blob bound to this PCR's value at unlock
// time can no longer be imported later in the same boot. PCR 15 is unused
// by firmware, the boot loader and systemd's measured-boot phases, and is
// resettable only by a reboot.
const WindowPCR = 15

// ErrPCROutOfRange is returned for a PCR index outside 0-23.
var ErrPCROutOfRange = errors.New("PCR index out of range")

// noSHA256Bank is the error for a TPM whose SHA-256 bank is not allocated.
var noSHA256Bank = &UnsupportedError{Feature: "SHA-256 PCR bank",
	Reason: "the SHA-256 bank is not allocated (allocate it with 'tpm2_pcrallocate sha256:all' and reboot)"}

func checkPCR(pcr int) error {
	if pcr < 0 || pcr >= NumPCRs {
		return fmt.Errorf("%w: PCR %d (a TPM has PCRs 0 to %d)", ErrPCROutOfRange, pcr, NumPCRs-1)
	}
	return nil
}

// PCRs reads the named PCRs from the SHA-256 bank; with no arguments it reads
// all 24. The result is what server.CreateImportBlob takes to bind a secret
// to these PCR values, and what a policy compares against.
func (t *TPM) PCRs(pcrs ...int) (*tpmpb.PCRs, error) {
	if len(pcrs) == 0 {
		for i := range NumPCRs {
			pcrs = append(pcrs, i)
		}
	}
	sel := tpm2.PCRSelection{Hash: tpm2.AlgSHA256}
	for _, p := range pcrs {
		if err := checkPCR(p); err != nil {
			return nil, fmt.Errorf("read PCRs: %w", err)
		}
		if !slices.Contains(sel.PCRs, p) {
			sel.PCRs = append(sel.PCRs, p)
		}
	}
	slices.Sort(sel.PCRs)
	if err := t.lock(); err != nil {
		return nil, err
	}
	defer t.mu.Unlock()
	vals, err := client.ReadPCRs(t.rw, sel)
	if err != nil {
		return nil, fmt.Errorf("read SHA-256 PCRs %v: %w", sel.PCRs, err)
	}
	for _, p := range sel.PCRs {
		if _, ok := vals.Pcrs[uint32(p)]; !ok {
			return nil, fmt.Errorf("read SHA-256 PCR %d: %w", p, noSHA256Bank)
		}
	}
	return vals, nil
}

// Extend measures data into pcr: every allocated PCR bank whose hash Go
// implements (SHA-1, SHA-256, SHA-384, SHA-512) is extended with that hash of
// data, so the SHA-256 bank becomes SHA-256(old || SHA-256(data)). Use
// [WindowPCR] to close the window after an unlock. PCRs 17-22 need a
// locality other than 0 and the TPM refuses them.
func (t *TPM) Extend(pcr int, data []byte) error {
	if err := checkPCR(pcr); err != nil {
		return fmt.Errorf("extend PCR: %w", err)
	}
	if err := t.lock(); err != nil {
		return err
	}
	defer t.mu.Unlock()
	banks, err := client.AllocatedPCRs(t.rw)
	if err != nil {
		return fmt.Errorf("extend PCR %d: %w", pcr, err)
	}
	extended := false
	for _, bank := range banks {
		if !slices.Contains(bank.PCRs, pcr) {
			continue
		}
		h, err := bank.Hash.Hash()
		if err != nil || !h.Available() {
			continue // e.g. SM3: no Go implementation; that bank is left alone
		}
		digest := hashOf(h, data)
		if err := tpm2.PCRExtend(t.rw, tpmutil.Handle(pcr), bank.Hash, digest, ""); err != nil {
			return fmt.Errorf("extend PCR %d (%v bank): %w", pcr, h, err)
		}
		if bank.Hash == tpm2.AlgSHA256 {
			extended = true
		}
	}
	if !extended {
		return fmt.Errorf("extend PCR %d: %w", pcr, noSHA256Bank)
	}
	return nil
}

func hashOf(h crypto.Hash, data []byte) []byte {
	if h == crypto.SHA256 {
		s := sha256.Sum256(data)
		return s[:]
	}
	w := h.New()
	w.Write(data)
	return w.Sum(nil)
}

// eventLogFile is where Linux exposes the firmware's TCG event log.
const eventLogFile = "/sys/kernel/security/tpm0/binary_bios_measurements"

// EventLog is the firmware's TCG event log, as raw bytes for the verifier
// to replay (attest parses it; this package does not).
type EventLog struct {
	// Raw is the crypto-agile TCG event log; empty when Available is false.
	Raw []byte
	// Source is the file the log was read from, if any.
	Source string
	// Available reports whether the TPM has a firmware event log at all.
	Available bool
	// Reason says why the log is empty when Available is false.
	Reason string
}

// EventLog returns the firmware event log. swtpm and the simulator have no
// firmware, so for them, and for a device whose kernel exposes no log, it
// returns an empty log with Available false and the Reason, and no error:
// an attestation then carries no event log and verifies on its quotes alone.
func (t *TPM) EventLog() (*EventLog, error) {
	switch t.kind {
	case Swtpm, Simulator:
		return &EventLog{Reason: fmt.Sprintf("a %s TPM has no firmware, so no firmware event log", t.kind)}, nil
	}
	if t.eventLogPath == "" {
		return &EventLog{Reason: "the kernel exposes no event log at " + eventLogFile + " (mount securityfs on /sys/kernel/security, or the firmware kept none)"}, nil
	}
	raw, err := os.ReadFile(t.eventLogPath)
	if err != nil {
		if errors.Is(err, os.ErrPermission) {
			return nil, fmt.Errorf("read event log: %w (run as root)", err)
		}
		return nil, fmt.Errorf("read event log: %w", err)
	}
	if len(raw) == 0 {
		return &EventLog{Source: t.eventLogPath, Reason: "the event log at " + t.eventLogPath + " is empty"}, nil
	}
	return &EventLog{Raw: raw, Source: t.eventLogPath, Available: true}, nil
}
