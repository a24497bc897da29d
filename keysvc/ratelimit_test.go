package keysvc_test

import (
	"net"
	"net/http"
	"testing"

	"github.com/keygate/keygate/keysvc"
	"github.com/keygate/keygate/keysvc/api"
	"github.com/keygate/keygate/tpm"
)

// from returns a copy of e whose VM API requests come from source address
// ip (any 127/8 address reaches the service's 127.0.0.1 listener on Linux).
func (e *env) from(t testing.TB, ip string) *env {
	t.Helper()
	tr := e.client.Transport.(*http.Transport).Clone()
	tr.DialContext = (&net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(ip)}}).DialContext
	t.Cleanup(tr.CloseIdleConnections)
	c := *e
	c.client = &http.Client{Transport: tr, Timeout: e.client.Timeout}
	return &c
}

// TestVMRateLimit checks that the per-VM limit cannot be spent by someone
// who merely names the VM: requests with a wrong EK or AK, or for another
// VM, leave the real VM's budget alone, and so do requests with the VM's
// (public) keys from another address; the VM itself is still limited.
func TestVMRateLimit(t *testing.T) {
	e := startEnv(t, t.TempDir(), keysvc.WithRateLimits(0, 1)) // burst 2 per VM and address
	v := openVM(t)
	vol := setup(t, e, v, "web-1")
	attacker := e.from(t, "127.0.0.2")
	if code, body := attacker.vm(t, "POST", "/v1/challenge", api.ChallengeRequest{VM: "ghost", Volume: "v", EKPub: v.ekPEM, AKPub: v.akPEM}); code != http.StatusForbidden {
		t.Fatalf("the attacker's address does not reach the service: %d %s", code, body)
	}

	challenge := func(c *env, req api.ChallengeRequest) int {
		code, _ := c.vm(t, "POST", "/v1/challenge", req)
		return code
	}
	wrong := []struct {
		name   string
		path   string
		body   any
		reason string
	}{
		{"wrong EK", "/v1/challenge", api.ChallengeRequest{VM: "web-1", Volume: vol, EKPub: randomPEM(t), AKPub: v.akPEM}, api.ReasonUnknownEK},
		{"wrong AK", "/v1/challenge", api.ChallengeRequest{VM: "web-1", Volume: vol, EKPub: v.ekPEM, AKPub: randomPEM(t)}, api.ReasonUnknownAK},
		{"activate with wrong EK", "/v1/activate", api.ActivateRequest{VM: "web-1", EKPub: randomPEM(t), AKPublic: akPublic(t, v)}, api.ReasonUnknownEK},
	}
	for _, tt := range wrong {
		t.Run("attacker "+tt.name, func(t *testing.T) {
			// From the VM's own address too: the keys are checked first.
			for _, c := range []*env{attacker, e} {
				for range 10 {
					code, body := c.vm(t, "POST", tt.path, tt.body)
					wantRefusal(t, code, body, tt.reason)
				}
			}
		})
	}

	real := api.ChallengeRequest{VM: "web-1", Volume: vol, EKPub: v.ekPEM, AKPub: v.akPEM}
	t.Run("attacker with the public keys from elsewhere", func(t *testing.T) {
		got := []int{challenge(attacker, real), challenge(attacker, real), challenge(attacker, real)}
		if got[2] != http.StatusTooManyRequests {
			t.Fatalf("codes %v, want the attacker's own bucket to run out", got)
		}
	})

	t.Run("real VM still served, and still limited", func(t *testing.T) {
		got := []int{challenge(e, real), challenge(e, real), challenge(e, real)}
		if got[0] != http.StatusOK || got[1] != http.StatusOK || got[2] != http.StatusTooManyRequests {
			t.Fatalf("codes %v, want 200 200 429", got)
		}
	})

	t.Run("another VM has its own budget", func(t *testing.T) {
		setup(t, e, v, "web-2")
		if code := challenge(e, api.ChallengeRequest{VM: "web-2", Volume: "web-2-vol", EKPub: v.ekPEM, AKPub: v.akPEM}); code != http.StatusOK {
			t.Fatalf("web-2: %d, want 200", code)
		}
	})
}

// akPublic is the VM's AK public area (TPMT_PUBLIC), from an attestation.
func akPublic(t testing.TB, v *vmTPM) []byte {
	t.Helper()
	att, err := v.tpm.Attest(make([]byte, 32), tpm.ECC)
	if err != nil {
		t.Fatal(err)
	}
	return att.GetAkPub()
}
