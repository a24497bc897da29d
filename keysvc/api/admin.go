package api

import (
	"encoding/json"
	"time"
)

// EnrollRequest is the body of POST /v1/admin/vms.
type EnrollRequest struct {
	Name  string `json:"name"`
	EKPub string `json:"ek_pub,omitempty"` // PEM; or:
	// EKCert is the TPM's EK certificate, PEM, with any intermediates after
	// it; it must chain to the service's EK roots (WithEKRoots). Its key is
	// enrolled as the EK.
	EKCert              string `json:"ek_cert,omitempty"`
	AKPub               string `json:"ak_pub,omitempty"` // PEM; without it unlocks are refused
	ProvisioningAllowed bool   `json:"provisioning_allowed,omitempty"`
}

// VMInfo is how the admin API shows a VM.
type VMInfo struct {
	Name                string          `json:"name"`
	EKFingerprint       string          `json:"ek_fingerprint"`
	AKFingerprint       string          `json:"ak_fingerprint,omitempty"`
	EKPub               string          `json:"ek_pub"`
	AKPub               string          `json:"ak_pub,omitempty"`
	ProvisioningAllowed bool            `json:"provisioning_allowed"`
	Revoked             bool            `json:"revoked"`
	LearnArmed          bool            `json:"learn_armed"`
	Policy              json.RawMessage `json:"policy"`
	Created             time.Time       `json:"created"`
	Updated             time.Time       `json:"updated"`
	// Next says what the operator still has to do, if anything.
	Next string `json:"next,omitempty"`
	// Tampered, in a list, says why the row fails its integrity check (it
	// was changed outside the service, and refuses every unlock).
	Tampered string `json:"tampered,omitempty"`
}

// VolumeRequest is the body of POST /v1/admin/volumes. Without Key the
// service makes a random UKSize-byte unwrap key (volume create); with it,
// Key is the key file's bytes (volume import).
type VolumeRequest struct {
	ID  string `json:"id"`
	VM  string `json:"vm"`
	Key []byte `json:"key,omitempty"` // base64
}

// VolumeInfo is how the admin API shows a volume (never its key).
type VolumeInfo struct {
	ID       string     `json:"id"`
	VM       string     `json:"vm"`
	Erased   bool       `json:"erased"`
	ErasedAt *time.Time `json:"erased_at,omitempty"`
	Created  time.Time  `json:"created"`
	// Tampered: as VMInfo's.
	Tampered string `json:"tampered,omitempty"`
	// Rotation is RotationPending while a second UK waits for the VM to
	// take it (`keysvc volume rotate`), since RotationStarted.
	Rotation        string     `json:"rotation,omitempty"`
	RotationStarted *time.Time `json:"rotation_started,omitempty"`
}

// AuditVerifyResponse is the answer to GET /v1/admin/audit/verify.
type AuditVerifyResponse struct {
	OK       bool     `json:"ok"`
	Records  uint64   `json:"records"`
	LastSeq  uint64   `json:"last_seq"`
	Head     uint64   `json:"head"`
	Problems []string `json:"problems"`
	Omitted  int      `json:"omitted,omitempty"`
	// Retired counts records written under a master key since rotated
	// away, checked by hash and link only (audit.Report.Retired).
	Retired uint64 `json:"retired,omitempty"`
}

// MaxKeyFile bounds an imported key file: the unwrap key travels to the VM
// as a TPM keyedHash object, which holds at most 128 bytes
// (importblob.MaxSecret; keysvc checks at compile time that the two agree).
// A keygate key file is 32-64 bytes; cryptsetup's default 4 KiB key file
// is too long, and is refused at import rather than at every unlock.
const MaxKeyFile = 128

// KeyFileHint is what to do with a key file over MaxKeyFile.
const KeyFileHint = "make a key file of at most 128 bytes (head -c 32 /dev/urandom > new.key), " +
	"add it to the image with `keygate disk add-key IMAGE --key-file OLD.key --new-key-file new.key` " +
	"(or cryptsetup luksAddKey), and import new.key"

// SetAKRequest is the body of PUT /v1/admin/vms/{name}/ak.
type SetAKRequest struct {
	AKPub string `json:"ak_pub"` // PEM
}
