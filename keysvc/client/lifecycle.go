package client

import (
	"context"
	"net/url"

	"github.com/keygate/keygate/keysvc/api"
)

// Rotation and re-attestation (docs/protocol.md, "Rotation" and
// "Re-attestation").

// RotateVolume is POST /v1/admin/volumes/{id}/rotate: the volume gets a
// pending second unwrap key.
func (c *Client) RotateVolume(ctx context.Context, id string) (*api.VolumeInfo, error) {
	var out api.VolumeInfo
	return &out, c.Do(ctx, "POST", "/v1/admin/volumes/"+url.PathEscape(id)+"/rotate", "", nil, &out)
}

// CancelRotation is POST /v1/admin/volumes/{id}/rotate/cancel: the
// pending UK is destroyed at once if it was never released (Rotation is
// then ""), else the cancel waits for the VM (Rotation is
// api.RotationCancelling).
func (c *Client) CancelRotation(ctx context.Context, id string) (*api.VolumeInfo, error) {
	var out api.VolumeInfo
	return &out, c.Do(ctx, "POST", "/v1/admin/volumes/"+url.PathEscape(id)+"/rotate/cancel", "", nil, &out)
}

// ConfirmRotation is POST /v1/rotate under the session: proof is
// api.RotateProof(pending UK, session).
func (c *Client) ConfirmRotation(ctx context.Context, session string, proof []byte) (*api.RotateConfirmResponse, error) {
	var out api.RotateConfirmResponse
	return &out, c.Do(ctx, "POST", "/v1/rotate", session, api.RotateConfirmRequest{Proof: proof}, &out)
}

// ReattestChallenge is POST /v1/reattest/challenge under the session.
func (c *Client) ReattestChallenge(ctx context.Context, session string) (*api.ReattestChallengeResponse, error) {
	var out api.ReattestChallengeResponse
	return &out, c.Do(ctx, "POST", "/v1/reattest/challenge", session, nil, &out)
}

// Reattest is POST /v1/reattest under the session.
func (c *Client) Reattest(ctx context.Context, session string, req api.ReattestRequest) (*api.ReattestResponse, error) {
	var out api.ReattestResponse
	return &out, c.Do(ctx, "POST", "/v1/reattest", session, req, &out)
}
