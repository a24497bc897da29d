package tpm

import (
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/google/go-tpm-tools/client"
	attestpb "github.com/google/go-tpm-tools/proto/attest"
	tpmpb "github.com/google/go-tpm-tools/proto/tpm"
	"github.com/google/go-tpm/legacy/tpm2"

	"github.com/keygate/keygate/keymem"
)

// ErrWrongTPM is returned by [TPM.Import] when the blob was not made for
// this TPM's EK (of the algorithm asked for): another machine's blob, or
// one sealed to the RSA EK when the ECC one was used, or vice versa.
var ErrWrongTPM = errors.New("import blob was not made for this TPM's EK")

// ErrPCRMismatch is returned by [TPM.Import] when the blob is bound to PCR
// values the TPM does not have now: the machine booted something else, or
// [WindowPCR] was already extended after an earlier unlock in this boot.
var ErrPCRMismatch = errors.New("PCR values differ from those the import blob is bound to")

// Import recovers the secret sealed in blob, a go-tpm-tools ImportBlob that
// package tpm/importblob (or server.CreateImportBlob) made for this TPM's EK of algorithm alg and,
// optionally, for PCR values. The TPM decrypts it only if it holds that EK
// and, for a PCR-bound blob, if its SHA-256 (or whichever bank the blob
// names) PCRs have those values now.
//
// The secret is returned in key memory (keymem: locked, guarded pages,
// registered as key pages until Destroy), and the heap copy the
// TPM library returned is zeroed; the caller must Destroy the Secret. Copies made inside go-tpm's command marshalling are out
// of this package's reach.
//
// Errors wrap [ErrWrongTPM] when the blob was made for another EK, and
// [ErrPCRMismatch] when the PCR state differs.
func (t *TPM) Import(blob *tpmpb.ImportBlob, alg Alg) (*Secret, error) {
	if blob == nil || len(blob.GetDuplicate()) == 0 || len(blob.GetEncryptedSeed()) == 0 || len(blob.GetPublicArea()) == 0 {
		return nil, errors.New("import: blob is empty or incomplete (want an import blob from the key service)")
	}
	if err := t.lock(); err != nil {
		return nil, err
	}
	defer t.mu.Unlock()
	// Every response of this exchange passes through scrub, which wipes
	// the library's response buffers when it is done: TPM2_Unseal's
	// carries the secret in plaintext, and go-tpm would leave it on the
	// heap until the memory is reused.
	scrub := &scrubRW{ReadWriteCloser: t.rw}
	t.rw = scrub
	defer func() {
		t.rw = scrub.ReadWriteCloser
		scrub.wipe()
	}()
	ek, err := t.loadEK(alg)
	if err != nil {
		return nil, fmt.Errorf("import: %w", err)
	}
	defer ek.Close()
	secret, err := ek.Import(blob)
	if err != nil {
		return nil, t.classifyImportError(err, alg, blob)
	}
	buf, err := keymem.FromBytes(secret) // wipes secret
	if err != nil {
		return nil, fmt.Errorf("import: %w", err)
	}
	return &Secret{buf}, nil
}

// Secret is a key Import recovered, in locked memory whose pages are in
// the key-page registry (which a monitor of this process follows) until
// Destroy.
type Secret struct {
	*keymem.Buffer
}

// classifyImportError turns the TPM's response codes into the two failures
// a caller can act on. The TPM says RC_INTEGRITY (or RC_VALUE/RC_ECC_POINT,
// RC_SIZE on the seed) when the seed was encrypted to another EK, and
// RC_POLICY_FAIL when the unseal policy (the PCR values) does not match.
// swtpm (libtpms 0.9) answers TPM_RC_FAILURE to TPM2_Import of an RSA seed
// it cannot decrypt, yet keeps working: a failure at the import step after
// which the TPM still answers is a wrong EK too. The caller holds t.mu.
func (t *TPM) classifyImportError(err error, alg Alg, blob *tpmpb.ImportBlob) error {
	rc := responseCode(err)
	var e0 tpm2.Error
	if errors.As(err, &e0) && e0.Code == tpm2.RCFailure && strings.HasPrefix(err.Error(), "import failed") && t.probe() == nil {
		rc = tpm2.RCValue // rejected seed, not a TPM in failure mode
	}
	switch {
	case rc == tpm2.RCPolicyFail:
		return fmt.Errorf("import: %w: the blob is bound to PCRs %v of bank %v (the machine booted something else, or PCR %d was extended after an earlier unlock; reboot or ask keysvc for a new blob): %v",
			ErrPCRMismatch, pcrList(blob.GetPcrs()), blob.GetPcrs().GetHash(), WindowPCR, err)
	case rc == tpm2.RCIntegrity || rc == tpm2.RCValue || rc == tpm2.RCECCPoint || rc == tpm2.RCSize || rc == tpm2.RCKey || rc == tpm2.RCScheme:
		return fmt.Errorf("import: %w: the blob was sealed to another EK than this TPM's %s EK (check the EK enrolled for this VM, and that --rsa matches how it was enrolled): %v",
			ErrWrongTPM, alg, err)
	}
	return fmt.Errorf("import: %w", err)
}

// responseCode digs the TPM format-1 or format-0 response code out of a
// legacy go-tpm error, or returns 0.
func responseCode(err error) tpm2.RCFmt1 {
	var (
		pe tpm2.ParameterError
		he tpm2.HandleError
		se tpm2.SessionError
		e0 tpm2.Error
	)
	switch {
	case errors.As(err, &pe):
		return pe.Code
	case errors.As(err, &he):
		return he.Code
	case errors.As(err, &se):
		return se.Code
	case errors.As(err, &e0):
		if e0.Code == tpm2.RCPolicy {
			return tpm2.RCPolicyFail
		}
	}
	return 0
}

func pcrList(p *tpmpb.PCRs) []int {
	var l []int
	for i := range NumPCRs {
		if _, ok := p.GetPcrs()[uint32(i)]; ok {
			l = append(l, i)
		}
	}
	return l
}

// Attest quotes every allocated PCR bank with the AK of algorithm alg over
// nonce, and returns a go-tpm-tools Attestation holding the AK public area,
// the quotes and the firmware event log (none for swtpm and the simulator;
// see [TPM.EventLog]). The verifier checks it with server.VerifyAttestation
// against the enrolled AK and the same nonce. nonce must not be empty and
// should come from the verifier (the keysvc challenge).
func (t *TPM) Attest(nonce []byte, alg Alg) (*attestpb.Attestation, error) {
	if len(nonce) == 0 {
		return nil, errors.New("attest: empty nonce (use the nonce from the key service's challenge)")
	}
	log, err := t.EventLog()
	if err != nil {
		return nil, fmt.Errorf("attest: %w", err)
	}
	if err := t.lock(); err != nil {
		return nil, err
	}
	defer t.mu.Unlock()
	ak, err := t.loadAK(alg)
	if err != nil {
		return nil, fmt.Errorf("attest: %w", err)
	}
	defer ak.Close()
	raw := log.Raw
	if raw == nil {
		raw = []byte{} // non-nil: stops client.Attest reading the host's log
	}
	att, err := ak.Attest(client.AttestOpts{Nonce: nonce, TCGEventLog: raw})
	if err != nil {
		return nil, fmt.Errorf("attest with %s AK: %w", alg, err)
	}
	return att, nil
}

// TransientHandles lists the transient objects and sessions loaded in the
// TPM. On a raw swtpm socket or the simulator it should be empty between
// calls, since this package flushes all it loads; through /dev/tpmrm0 the
// kernel's resource manager shows only this connection's handles.
func (t *TPM) TransientHandles() ([]uint32, error) {
	if err := t.lock(); err != nil {
		return nil, err
	}
	defer t.mu.Unlock()
	var all []uint32
	for _, ht := range []tpm2.HandleType{tpm2.HandleTypeTransient, tpm2.HandleTypeLoadedSession, tpm2.HandleTypePolicySession} {
		hs, err := client.Handles(t.rw, ht)
		if err != nil {
			return nil, fmt.Errorf("list handles of type %#x: %w", uint8(ht), err)
		}
		for _, h := range hs {
			all = append(all, uint32(h))
		}
	}
	return all, nil
}

// scrubRW passes TPM commands through and remembers each buffer a response
// was read into, so that wipe can clear them once the library has copied
// out what it needed. It must not outlive the command sequence it wraps.
type scrubRW struct {
	io.ReadWriteCloser
	bufs [][]byte
}

func (s *scrubRW) Read(p []byte) (int, error) {
	if f, ok := s.ReadWriteCloser.(*os.File); ok {
		// go-tpm waits for a device's response only when it sees an
		// *os.File, which this wrapper hides; Fd puts the descriptor in
		// blocking mode, so the read waits for the response instead.
		f.Fd()
	}
	n, err := s.ReadWriteCloser.Read(p)
	s.bufs = append(s.bufs, p)
	return n, err
}

func (s *scrubRW) wipe() {
	for _, b := range s.bufs {
		clear(b)
	}
	s.bufs = nil
}
