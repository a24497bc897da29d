// Package boot is keygate's bootstrap flow as a library: it takes a VM from
// its vTPM to an unlocked volume and keeps that volume unlocked only while
// the key service says so.
//
// Run does, in order: open the TPM; make the process undumpable with no
// core limit (before any key is in memory); read its EK and AK; ask the key service
// for a challenge; quote the PCRs over the challenge's nonce (with the
// firmware event log when the machine has one); send the quote to
// /v1/unlock; Import the returned blob in the TPM, which yields the unwrap
// key (UK) in locked memory; open the volume's keygate keyslot with it,
// which yields the volume key (DEK), kept with its AES round keys in locked
// memory by disk/xts; open the filesystem; extend the "unlock done" PCR
// (tpm.WindowPCR, 15), so that neither the TPM nor the key service (whose
// policies include PCR 15) releases the key again in this boot; and serve.
//
// While the volume is unlocked a heartbeat polls the session
// (POST /v1/events with a heartbeat, whose answer carries the session
// state). A "revoked" answer wipes the keys, closes the volume and stops
// serving. An unreachable key service is logged and retried; the volume
// stays unlocked, since the key is already in memory and the service is
// consulted again as soon as it returns.
//
// With Config.Monitor, the key-page monitor (ebpfmon) runs in this process
// from before the unlock (so that a failure to start it costs no release)
// until the lock. It follows the registry of key pages (package keymem)
// that the TPM import, disk and disk/xts fill as they make and destroy key
// buffers; the mode in force (detect or deny) and why is the first thing it
// logs. Each alert goes to the log, to OnEvent and, batched, to the key
// service's POST /v1/events under the session; with AlertLock the first
// critical alert locks the volume the way a revoke does.
//
// The package owns the VM side of the wire protocol (docs/protocol.md), the
// blank-device check and first-boot provisioning (--init-if-blank), and
// CreateVolume, the admin-side registration behind `keygate disk create
// --keysvc`. It does not own the TPM (package tpm), the verification
// (attest, keysvc), the volume format (disk, disk/luks2) or the 9P server
// (disk/ninep).
package boot
