package client

import (
	"context"

	"github.com/keygate/keygate/keysvc/api"
)

// The VM API. Each call fails over across the replicas as Do says; a
// challenge from one replica may be redeemed at another (the challenge's
// HMAC key derives from the master key all replicas share).

// Challenge is POST /v1/challenge.
func (c *Client) Challenge(ctx context.Context, req api.ChallengeRequest) (*api.ChallengeResponse, error) {
	var out api.ChallengeResponse
	return &out, c.Do(ctx, "POST", "/v1/challenge", "", req, &out)
}

// Unlock is POST /v1/unlock.
func (c *Client) Unlock(ctx context.Context, req api.UnlockRequest) (*api.UnlockResponse, error) {
	var out api.UnlockResponse
	return &out, c.Do(ctx, "POST", "/v1/unlock", "", req, &out)
}

// Provision is POST /v1/provision: Unlock for a blank volume, whose key the
// service makes.
func (c *Client) Provision(ctx context.Context, req api.UnlockRequest) (*api.UnlockResponse, error) {
	var out api.UnlockResponse
	return &out, c.Do(ctx, "POST", "/v1/provision", "", req, &out)
}

// Session is GET /v1/session under the session token an unlock returned.
func (c *Client) Session(ctx context.Context, session string) (*api.SessionResponse, error) {
	var out api.SessionResponse
	return &out, c.Do(ctx, "GET", "/v1/session", session, nil, &out)
}

// Events is POST /v1/events: a heartbeat or monitor alerts, answered with
// the session's state (so a heartbeat learns of a revoke).
func (c *Client) Events(ctx context.Context, req api.EventsRequest) (*api.EventsResponse, error) {
	var out api.EventsResponse
	return &out, c.Do(ctx, "POST", "/v1/events", "", req, &out)
}

// Activate is POST /v1/activate, the first step of AK enrollment by
// credential activation.
func (c *Client) Activate(ctx context.Context, req api.ActivateRequest) (*api.ActivateResponse, error) {
	var out api.ActivateResponse
	return &out, c.Do(ctx, "POST", "/v1/activate", "", req, &out)
}

// ActivateFinish is POST /v1/activate/finish.
func (c *Client) ActivateFinish(ctx context.Context, req api.ActivateFinishRequest) (*api.ActivateFinishResponse, error) {
	var out api.ActivateFinishResponse
	return &out, c.Do(ctx, "POST", "/v1/activate/finish", "", req, &out)
}
