package audit

import "encoding/json"

// Details is the typed payload of an audit event. Only the types in this
// package implement it, so a caller cannot slip an arbitrary map (and with it
// a key, token or passphrase) into the log.
//
// Secrets must never enter the audit log: no field of any Details type may
// hold key material (UK, DEK, master or sub-keys), a session or admin token,
// a passphrase, or an import blob. Identify such things by a fingerprint or an
// ID instead. Adding a field here is a security review point.
type Details interface {
	auditDetails()
}

// Enroll records a VM enrollment or a change to its keys.
type Enroll struct {
	EKFingerprint string `json:"ek_fingerprint"`           // SHA-256 of the EK public key, hex
	AKFingerprint string `json:"ak_fingerprint,omitempty"` // SHA-256 of the AK public key, hex
	AKProof       string `json:"ak_proof,omitempty"`       // "enrolled" or "credential-activation"
	Provisioning  bool   `json:"provisioning_allowed"`
}

// Unlock records a released unwrap key.
type Unlock struct {
	Volume string `json:"volume"`
	// SessionID identifies the session; it is not the session's bearer
	// credential.
	SessionID string `json:"session_id,omitempty"`
	Remote    string `json:"remote,omitempty"`
	// NextKey: a rotation's pending UK was released too.
	NextKey bool `json:"next_key,omitempty"`
}

// PCRMismatch is one failed PCR comparison.
type PCRMismatch struct {
	PCR     int      `json:"pcr"`
	Allowed []string `json:"allowed"` // hex
	Got     string   `json:"got"`     // hex
}

// Deny records a refused request and why.
type Deny struct {
	Volume     string        `json:"volume,omitempty"`
	Reason     string        `json:"reason"`
	Mismatches []PCRMismatch `json:"mismatches,omitempty"`
	Rules      []string      `json:"rules,omitempty"` // failed event-log rules
	Remote     string        `json:"remote,omitempty"`
}

// Revoke records that a VM was revoked (or reinstated).
type Revoke struct {
	Reinstated bool   `json:"reinstated,omitempty"`
	Reason     string `json:"reason,omitempty"`
}

// Erase records that a volume's unwrap key was destroyed.
type Erase struct {
	Volume string `json:"volume"`
	Reason string `json:"reason,omitempty"`
}

// Learn records that learn mode was armed, or that it captured a policy.
type Learn struct {
	Armed bool `json:"armed,omitempty"`
	// PCRs are the captured values (hex) by PCR index.
	PCRs map[int]string `json:"pcrs,omitempty"`
	// Policy is the whole policy stored by the capture, and SHA256 its
	// hash, as in a Policy record.
	Policy json.RawMessage `json:"policy,omitempty"`
	SHA256 string          `json:"sha256,omitempty"`
}

// Admin records an admin API call (including refused ones).
type Admin struct {
	Method string `json:"method"`
	Path   string `json:"path"`
	Status int    `json:"status"`
	Remote string `json:"remote,omitempty"`
	// Client names the authenticated client (certificate subject or token
	// ID), never the token itself.
	Client string `json:"client,omitempty"`
}

// Alert records a warning or critical event reported by a VM (a monitor
// alert). EventID names the stored event (GET /v1/admin/events), which
// holds every field the VM sent.
type Alert struct {
	Session   string  `json:"session_id,omitempty"`
	EventID   int64   `json:"event_id,omitempty"`
	Kind      string  `json:"kind"`
	Severity  string  `json:"severity"`
	PID       int     `json:"pid,omitempty"` // the accessor
	Comm      string  `json:"comm,omitempty"`
	Exe       string  `json:"exe,omitempty"`
	UID       *uint32 `json:"uid,omitempty"`
	TargetPID int     `json:"target_pid,omitempty"`
	Overlap   bool    `json:"overlap,omitempty"` // the access could reach key pages
	Result    *int64  `json:"result,omitempty"`
	Denied    bool    `json:"denied,omitempty"`
	Mode      string  `json:"mode,omitempty"`
}

// Policy records a policy set by an administrator: the whole canonical
// policy as stored (PCR values and event-log rules), its SHA-256, and what
// changed from the previous one.
type Policy struct {
	Policy     json.RawMessage `json:"policy"`
	SHA256     string          `json:"sha256"`
	PrevSHA256 string          `json:"prev_sha256"`
	// Changes lists what differs from the previous policy, one line each
	// ("pcr 7: + <hex>", "pcr 4: - <hex>", "secure_boot: <old> -> <new>").
	Changes []string `json:"changes,omitempty"`
}

// Volume records a volume made by an administrator.
type Volume struct {
	Volume string `json:"volume"`
	VM     string `json:"vm"`
	// Source is "created" (the service made the UK) or "imported" (from a
	// key file).
	Source        string `json:"source"`
	EKFingerprint string `json:"ek_fingerprint"` // of the owner VM, bound into the sealed UK
}

// Genesis records that the key service adopted the store: every row that
// decides a release was authenticated under the master key, and the
// store's anchor written. Adopted counts the rows that had no MAC yet (a
// store from before row MACs).
type Genesis struct {
	VMs     int `json:"vms"`
	Volumes int `json:"volumes"`
	Adopted int `json:"adopted"`
}

// Tamper records a stored row that failed its integrity check.
type Tamper struct {
	Kind   string `json:"kind"` // "vm" or "volume"
	Name   string `json:"name"`
	Detail string `json:"detail"`
	Remote string `json:"remote,omitempty"`
}

// Summary records requests that were refused but, over a per-source
// budget, not recorded one by one.
type Summary struct {
	Remote string `json:"remote"`
	Count  uint64 `json:"count"`
	First  string `json:"first"` // RFC 3339
	Last   string `json:"last"`
	// Reason and Path are those of the last refusal summarised.
	Reason string `json:"reason,omitempty"`
	Path   string `json:"path,omitempty"`
}

// Rotate records a step of an unwrap-key rotation: "started" (an
// administrator made the pending UK) or "completed" (the VM proved it holds
// it, and the old UK was destroyed).
type Rotate struct {
	Volume    string `json:"volume"`
	Step      string `json:"step"`
	SessionID string `json:"session_id,omitempty"` // the session that proved the new UK
	Remote    string `json:"remote,omitempty"`
	// Generation is the volume's rotation the step belongs to (0 in
	// records from before rotations were numbered).
	Generation uint64 `json:"generation,omitempty"`
	// Detail says why a cancel removed a row at once (it failed its
	// integrity check).
	Detail string `json:"detail,omitempty"`
}

// Reattest records a failed re-attestation ("lock") or a session whose
// re-attestations stopped arriving ("stale").
type Reattest struct {
	Volume     string        `json:"volume"`
	SessionID  string        `json:"session_id"`
	Result     string        `json:"result"` // "lock" or "stale"
	Reason     string        `json:"reason,omitempty"`
	Mismatches []PCRMismatch `json:"mismatches,omitempty"`
	Rules      []string      `json:"rules,omitempty"`
	Remote     string        `json:"remote,omitempty"`
}

func (Rotate) auditDetails()   {}
func (Reattest) auditDetails() {}
func (Policy) auditDetails()   {}
func (Volume) auditDetails()   {}
func (Genesis) auditDetails()  {}
func (Tamper) auditDetails()   {}
func (Summary) auditDetails()  {}
func (Enroll) auditDetails()   {}
func (Unlock) auditDetails()   {}
func (Deny) auditDetails()     {}
func (Revoke) auditDetails()   {}
func (Erase) auditDetails()    {}
func (Learn) auditDetails()    {}
func (Admin) auditDetails()    {}
func (Alert) auditDetails()    {}
