package client

import (
	"context"
	"encoding/json"
	"fmt"
	"net/url"

	"github.com/keygate/keygate/keysvc/api"
)

// The admin API, authenticated with Config.Token. Raw answers (for a CLI
// that prints the service's JSON) come from Do with a *[]byte.

// EnrollVM is POST /v1/admin/vms.
func (c *Client) EnrollVM(ctx context.Context, req api.EnrollRequest) (*api.VMInfo, error) {
	var out api.VMInfo
	return &out, c.Do(ctx, "POST", "/v1/admin/vms", "", req, &out)
}

// VM is GET /v1/admin/vms/{name}.
func (c *Client) VM(ctx context.Context, name string) (*api.VMInfo, error) {
	var out api.VMInfo
	return &out, c.Do(ctx, "GET", "/v1/admin/vms/"+url.PathEscape(name), "", nil, &out)
}

// SetAK is PUT /v1/admin/vms/{name}/ak.
func (c *Client) SetAK(ctx context.Context, name, akPEM string) (*api.VMInfo, error) {
	var out api.VMInfo
	return &out, c.Do(ctx, "PUT", "/v1/admin/vms/"+url.PathEscape(name)+"/ak", "", api.SetAKRequest{AKPub: akPEM}, &out)
}

// Revoke is POST /v1/admin/vms/{name}/revoke.
func (c *Client) Revoke(ctx context.Context, name string) (*api.VMInfo, error) {
	var out api.VMInfo
	return &out, c.Do(ctx, "POST", "/v1/admin/vms/"+url.PathEscape(name)+"/revoke", "", nil, &out)
}

// LearnPolicy is POST /v1/admin/vms/{name}/policy/learn.
func (c *Client) LearnPolicy(ctx context.Context, name string) error {
	return c.Do(ctx, "POST", "/v1/admin/vms/"+url.PathEscape(name)+"/policy/learn", "", nil, nil)
}

// Policy is GET /v1/admin/vms/{name}/policy, decoded into out.
func (c *Client) Policy(ctx context.Context, name string, out any) error {
	return c.Do(ctx, "GET", "/v1/admin/vms/"+url.PathEscape(name)+"/policy", "", nil, out)
}

// SetPolicy is PUT /v1/admin/vms/{name}/policy; policy is anything that
// marshals to the policy JSON (attest.Policy, json.RawMessage).
func (c *Client) SetPolicy(ctx context.Context, name string, policy any) error {
	return c.Do(ctx, "PUT", "/v1/admin/vms/"+url.PathEscape(name)+"/policy", "", policy, nil)
}

// AddVolume is POST /v1/admin/volumes: volume create without req.Key,
// import with it. The request body, which carries the key, is wiped once
// sent; req.Key stays the caller's to wipe.
func (c *Client) AddVolume(ctx context.Context, req api.VolumeRequest) (*api.VolumeInfo, error) {
	var out api.VolumeInfo
	return &out, c.Do(ctx, "POST", "/v1/admin/volumes", "", req, &out)
}

// Volume is GET /v1/admin/volumes/{id}.
func (c *Client) Volume(ctx context.Context, id string) (*api.VolumeInfo, error) {
	var out api.VolumeInfo
	return &out, c.Do(ctx, "GET", "/v1/admin/volumes/"+url.PathEscape(id), "", nil, &out)
}

// Erase is POST /v1/admin/volumes/{id}/erase: the volume's key is
// destroyed.
func (c *Client) Erase(ctx context.Context, id string) (*api.VolumeInfo, error) {
	var out api.VolumeInfo
	return &out, c.Do(ctx, "POST", "/v1/admin/volumes/"+url.PathEscape(id)+"/erase", "", nil, &out)
}

// AuditVerify is GET /v1/admin/audit/verify.
func (c *Client) AuditVerify(ctx context.Context) (*api.AuditVerifyResponse, error) {
	var out api.AuditVerifyResponse
	return &out, c.Do(ctx, "GET", "/v1/admin/audit/verify", "", nil, &out)
}

// Audit is GET /v1/admin/audit?from=SEQ, the records as the service sends
// them.
func (c *Client) Audit(ctx context.Context, from uint64) (json.RawMessage, error) {
	var out []byte
	return out, c.Do(ctx, "GET", fmt.Sprintf("/v1/admin/audit?from=%d", from), "", nil, &out)
}
