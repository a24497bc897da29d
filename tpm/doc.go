// Package tpm is keygate's access to a TPM 2.0: the VM's vTPM through
// /dev/tpmrm0, a swtpm unix socket, or the in-process go-tpm-tools
// simulator.
//
// It owns the TPM-side half of the protocol in DESIGN.md:
//   - opening a TPM from a spec string (see [Open]);
//   - the endorsement key (EK) and attestation key (AK) public keys, ECC P-256
//     by default and RSA-2048 where asked, with PEM helpers for enrollment;
//   - PCR reads (SHA-256 bank) and extends, including the extend of
//     [WindowPCR] that "closes the window" after an unlock;
//   - the firmware's TCG event log;
//   - quotes, as a go-tpm-tools attest.Attestation signed by the AK
//     ([TPM.Attest]);
//   - [TPM.Import], which turns a go-tpm-tools ImportBlob made by package
//     tpm/importblob (or go-tpm-tools' server.CreateImportBlob) for this
//     TPM's EK (optionally bound to PCR values) back into the secret,
//     straight into key memory.
//
// It does not verify anything: checking an attestation against enrolled keys
// and a PCR policy is package attest's job, and that code never touches a
// TPM. Nor does it decide which PCR values a blob is bound to; keysvc does.
//
// Every transient object (EK, AK, imported blob) and every policy session
// this package loads is flushed before the call that loaded it returns, so
// that a raw swtpm socket, which has no resource manager, never runs out of
// object slots. [TPM.TransientHandles] lets tests prove it.
package tpm
