package api

import "time"

// MasterKeyInfo answers GET /v1/admin/master-key.
type MasterKeyInfo struct {
	Fingerprint string        `json:"fingerprint"` // masterkey.Fingerprint of the current key
	Kind        string        `json:"kind"`        // file or pkcs11
	Rotation    *RotationInfo `json:"rotation,omitempty"`
}

// RotationInfo is a master-key rotation under way.
type RotationInfo struct {
	OldKey  string    `json:"old_key"`
	NewKey  string    `json:"new_key"`
	Started time.Time `json:"started"`
	VMs     int       `json:"vms_done"`
	Volumes int       `json:"volumes_done"`
	Running bool      `json:"running"`
	// Error is why the rotation stopped, if it did; POST rotate again
	// resumes it.
	Error string `json:"error,omitempty"`
}
