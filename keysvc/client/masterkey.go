package client

import (
	"context"

	"github.com/keygate/keygate/keysvc/api"
)

// MasterKey is GET /v1/admin/master-key: the master key's fingerprint and
// kind, and the rotation under way, if any.
func (c *Client) MasterKey(ctx context.Context) (*api.MasterKeyInfo, error) {
	var out api.MasterKeyInfo
	return &out, c.Do(ctx, "GET", "/v1/admin/master-key", "", nil, &out)
}

// RotateMasterKey is POST /v1/admin/master-key/rotate: it begins a
// master-key rotation, or resumes one that stopped, and returns at once;
// follow it with MasterKey.
func (c *Client) RotateMasterKey(ctx context.Context) (*api.MasterKeyInfo, error) {
	var out api.MasterKeyInfo
	return &out, c.Do(ctx, "POST", "/v1/admin/master-key/rotate", "", nil, &out)
}
