package boot

import (
	"context"
	"crypto/tls"
	"errors"
	"net/http"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	tpmpb "github.com/google/go-tpm-tools/proto/tpm"
	"google.golang.org/protobuf/proto"

	"github.com/keygate/keygate/disk"
	"github.com/keygate/keygate/internal/testutil"
	"github.com/keygate/keygate/keysvc"
	"github.com/keygate/keygate/keysvc/api"
	"github.com/keygate/keygate/keysvc/client"
	"github.com/keygate/keygate/tpm"
)

// cert is the key service's own server certificate, so that a stand-in
// replica is one the client trusts.
func (e *env) cert(t testing.TB) tls.Certificate {
	t.Helper()
	c, err := tls.LoadX509KeyPair(filepath.Join(e.dir, keysvc.CertFile), filepath.Join(e.dir, keysvc.CertKeyFile))
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// replica stops e, copies its data directory (master key, CA, server
// certificate, admin token, and its SQLite store as it is now), starts e
// again and a second key service on the copy. The two share every secret
// but not the store: what is enrolled after the copy is known to one only.
// (SQLite is one process's; replicas on one shared database are the
// PostgreSQL store's to test.)
func (e *env) replica(t testing.TB) *env {
	t.Helper()
	e.stop(t)
	dir := t.TempDir()
	// cp -a keeps the modes the service insists on (0600 secrets).
	if out, err := exec.Command("cp", "-a", e.dir+"/.", dir).CombinedOutput(); err != nil {
		t.Fatalf("copy the data directory: %v: %s", err, out)
	}
	e.start(t)
	r := &env{dir: dir, vmAddr: "127.0.0.1:0", adminAddr: "127.0.0.1:0", ca: e.ca, token: e.token}
	r.start(t)
	t.Cleanup(func() { r.stop(t) })
	var err error
	if r.adm, err = client.New(client.Config{URLs: []string{"https://" + r.adminAddr}, CA: r.ca, Token: r.token}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(r.adm.Close)
	return r
}

// TestBootFailover: a first replica that is down or unwell costs the boot
// nothing but its connect timeout; the volume unlocks at the next one.
func TestBootFailover(t *testing.T) {
	e := startEnv(t)
	for i, tc := range []struct {
		name  string
		first func(t *testing.T) string
	}{
		{"connection-refused", func(t *testing.T) string { return testutil.ClosedPort(t) }},
		{"no-tls-handshake", func(t *testing.T) string { return testutil.BlackHole(t) }},
		{"503", func(t *testing.T) string {
			return testutil.FixedServer(t, e.cert(t), http.StatusServiceUnavailable, "").URL
		}},
		{"503-retry-after", func(t *testing.T) string {
			return testutil.FixedServer(t, e.cert(t), http.StatusServiceUnavailable, "30").URL
		}},
		{"502", func(t *testing.T) string { return testutil.FixedServer(t, e.cert(t), http.StatusBadGateway, "").URL }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tp := openSim(t)
			vm := "fo" + string(rune('a'+i))
			e.enroll(t, tp, vm, false)
			img := e.volume(t, vm, vm+"-vol")
			ev := newEvents()
			c := e.cfg(tp, vm, img, ev)
			c.KeysvcURL = tc.first(t) + "," + e.url()
			b, err := Run(context.Background(), c)
			if err != nil {
				t.Fatalf("run: %v", err)
			}
			defer b.Close()
			roundTrip(t, b.FS())
			if slices.Contains(ev.kinds(), EventWaiting) {
				t.Fatal("the boot waited although a replica answered")
			}
			if b.cl.Current() != e.url() {
				t.Fatalf("the heartbeat starts at %s, not at the replica that answered", b.cl.Current())
			}
		})
	}
}

// TestDenialIsFinal: a refusal from one replica ends the boot; the
// replicas after it are never asked (a denial is not shopped around).
func TestDenialIsFinal(t *testing.T) {
	e := startEnv(t)
	for i, dead := range []int{0, 2} {
		t.Run(string(rune('0'+dead))+"-dead-before", func(t *testing.T) {
			tp := openSim(t)
			vm := "deny" + string(rune('a'+i))
			e.enroll(t, tp, vm, false)
			img := e.volume(t, vm, vm+"-vol")
			e.admin(t, "POST", "/v1/admin/vms/"+vm+"/revoke", nil, http.StatusOK)
			next := testutil.FixedServer(t, e.cert(t), http.StatusOK, "")
			var urls []string
			for range dead {
				urls = append(urls, testutil.ClosedPort(t))
			}
			c := e.cfg(tp, vm, img, nil)
			c.KeysvcURL = strings.Join(append(urls, e.url(), next.URL), ",")
			_, err := Run(context.Background(), c)
			wantReason(api.ReasonRevoked)(t, err)
			if n := next.Requests(); n != 0 {
				t.Fatalf("the replica after the one that refused was asked %d times", n)
			}
		})
	}
}

// TestChallengeAcrossReplicas: a challenge one replica issued is redeemed
// at another when the first dies in between (both derive the challenge
// key from the one master key), and the key released opens the volume.
func TestChallengeAcrossReplicas(t *testing.T) {
	e := startEnv(t)
	tp := openSim(t)
	e.enroll(t, tp, "roam", false)
	img := e.volume(t, "roam", "roam-vol")
	r := e.replica(t)
	cl, err := newClient([]string{e.url(), r.url()}, e.ca, "", 0)
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	ek, _ := tp.EK(tpm.ECC)
	ak, _ := tp.AK(tpm.ECC)
	ekPEM, _ := ek.PEM()
	akPEM, _ := ak.PEM()
	ctx := context.Background()
	ch, err := cl.Challenge(ctx, api.ChallengeRequest{VM: "roam", Volume: "roam-vol", EKPub: string(ekPEM), AKPub: string(akPEM)})
	if err != nil || cl.Current() != e.url() {
		t.Fatalf("challenge: %v (at %s)", err, cl.Current())
	}
	e.stop(t)
	att, err := tp.Attest(api.QuoteData(ch.Nonce, cl.CASHA256()), tpm.ECC)
	if err != nil {
		t.Fatal(err)
	}
	raw, _ := proto.Marshal(att)
	ur, err := cl.Unlock(ctx, api.UnlockRequest{Challenge: ch.Challenge, Attestation: raw})
	if err != nil {
		t.Fatalf("unlock at the second replica: %v", err)
	}
	if cl.Current() != r.url() {
		t.Fatalf("answered by %s, want the second replica %s", cl.Current(), r.url())
	}
	blob := &tpmpb.ImportBlob{}
	if err := proto.Unmarshal(ur.ImportBlob, blob); err != nil {
		t.Fatal(err)
	}
	uk, err := tp.Import(blob, tpm.ECC)
	if err != nil {
		t.Fatal(err)
	}
	defer uk.Destroy()
	key, err := disk.NewKey(uk.Bytes())
	if err != nil {
		t.Fatal(err)
	}
	im, err := disk.OpenImage(img, key, false)
	key.Destroy()
	if err != nil {
		t.Fatalf("the key the second replica released does not open the volume: %v", err)
	}
	im.Close()
	// The same challenge is spent at that replica now.
	if _, err := cl.Unlock(ctx, api.UnlockRequest{Challenge: ch.Challenge, Attestation: raw}); !errors.Is(err, ErrRefused) {
		t.Fatalf("replayed challenge: %v, want a refusal", err)
	}
}

// TestHeartbeatFailsOver: when the replica the boot unlocked at dies, the
// heartbeat carries on at the next one without an outage, and a revoke
// made there locks the volume.
func TestHeartbeatFailsOver(t *testing.T) {
	e := startEnv(t)
	tp := openSim(t)
	e.enroll(t, tp, "beat", false)
	img := e.volume(t, "beat", "beat-vol")
	r := e.replica(t)
	ev := newEvents()
	c := e.cfg(tp, "beat", img, ev)
	c.KeysvcURL = e.url() + "," + r.url()
	c.Serve9P = socketPath(t)
	b, err := Run(context.Background(), c)
	if err != nil {
		t.Fatalf("run: %v", err)
	}
	defer b.Close()
	ev.wait(t, EventServing)
	e.stop(t)
	r.admin(t, "POST", "/v1/admin/vms/beat/revoke", nil, http.StatusOK)
	wantLocked(t, b, ev)
	if slices.Contains(ev.kinds(), EventOutage) {
		t.Fatal("the heartbeat reported an outage although the second replica answered")
	}
}

// TestTokenListsReplicas: a volume created with several replicas carries
// them all in its keygate token, and boots from the token alone when the
// first is dead.
func TestTokenListsReplicas(t *testing.T) {
	e := startEnv(t)
	tp := openSim(t)
	e.enroll(t, tp, "listed", false)
	dead := testutil.ClosedPort(t)
	img := filepath.Join(t.TempDir(), "listed.img")
	res, err := CreateVolume(context.Background(), CreateConfig{Image: img, KeysvcURL: dead + "," + e.url(), AdminURL: "https://" + e.adminAddr,
		CA: e.ca, Token: e.token, VM: "listed", Volume: "listed-vol", Options: disk.CreateOptions{Size: 64 << 20, FS: disk.Ext4}})
	if err != nil {
		t.Fatal(err)
	}
	res.Wipe()
	st, err := inspect(img)
	if err != nil || st.token == nil {
		t.Fatalf("inspect: %v", err)
	}
	if got := st.token.URLs(); !slices.Equal(got, []string{dead, e.url()}) {
		t.Fatalf("token URLs %v", got)
	}
	c := e.cfg(tp, "listed", img, nil)
	c.KeysvcURL, c.CA = "", nil // all from the token, the CA by its pin
	b, err := Run(context.Background(), c)
	if err != nil {
		t.Fatalf("run from the token's list: %v", err)
	}
	defer b.Close()
	roundTrip(t, b.FS())
}
