package boot

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/keygate/keygate/disk/luks2"
	"github.com/keygate/keygate/keysvc"
)

// TestRelayThroughEditedTokenRefused is the attack of someone who can write
// the VM's disk and sit on its network path. The keygate token in the LUKS2
// header is not authenticated, so they point it at a relay of theirs and pin
// the relay's CA; the relay forwards every request to the real key service
// (the VM API needs no client credentials), which would let it answer
// later heartbeats "active" after a revoke. The VM's quote binds the CA it
// trusts (api.QuoteData), so the real service refuses a quote made through
// the relay and nothing is released. The same boot through the genuine
// token unlocks, so the refusal is the relay's doing.
func TestRelayThroughEditedTokenRefused(t *testing.T) {
	e := startEnv(t)
	real, err := url.Parse(e.url())
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(e.ca)
	proxy := httputil.NewSingleHostReverseProxy(real)
	proxy.Transport = &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS13}}
	var relayed atomic.Int32
	relay := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		relayed.Add(1)
		proxy.ServeHTTP(w, r)
	}))
	relayData, err := keysvc.Bootstrap(t.TempDir(), nil, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	cert, err := tls.LoadX509KeyPair(relayData.Path(keysvc.CertFile), relayData.Path(keysvc.CertKeyFile))
	if err != nil {
		t.Fatal(err)
	}
	caPEM, err := os.ReadFile(relayData.Path(keysvc.CAFile))
	if err != nil {
		t.Fatal(err)
	}
	blk, _ := pem.Decode(caPEM)
	cert.Certificate = append(cert.Certificate, blk.Bytes) // as keysvc serves its chain
	relay.TLS = &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS13}
	relay.StartTLS()
	defer relay.Close()

	for _, tc := range []struct {
		name    string
		edit    bool
		wantErr string
	}{
		{"genuine token", false, ""},
		{"token edited to the relay", true, "the VM trusts another CA"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tp := openSim(t)
			vm := "relay-" + map[bool]string{false: "a", true: "b"}[tc.edit]
			e.enroll(t, tp, vm, false)
			img := e.volume(t, vm, vm+"-vol")
			if tc.edit {
				editToken(t, img, relay.URL, relayData.CAFingerprint)
			}
			c := e.cfg(tp, vm, img, nil)
			c.KeysvcURL, c.CA = "", nil // the token alone says where and whom to trust
			c.MaxWait = 5 * time.Second
			before := relayed.Load()
			b, err := Run(context.Background(), c)
			if tc.wantErr == "" {
				if err != nil {
					t.Fatalf("boot with the genuine token: %v", err)
				}
				b.Close()
				return
			}
			if err == nil {
				b.Close()
				t.Fatal("the VM unlocked through a relay its edited token pinned")
			}
			if relayed.Load() == before {
				t.Fatalf("nothing went through the relay (%v), so this does not test the quote's binding", err)
			}
			t.Logf("refused: %v", err)
			if !strings.Contains(err.Error(), tc.wantErr) {
				t.Errorf("boot error %q, want the service's %q refusal", err, tc.wantErr)
			}
		})
	}
}

// editToken rewrites img's keygate token to send the VM to url and pin the
// CA whose SHA-256 is pin, as anyone who can write the disk can.
func editToken(t *testing.T, img, url, pin string) {
	t.Helper()
	f, err := os.OpenFile(img, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	vol, err := luks2.Open(f)
	if err != nil {
		t.Fatal(err)
	}
	id, kt, err := vol.FindKeygateToken()
	if err != nil {
		t.Fatalf("%s: %v", filepath.Base(img), err)
	}
	kt.URL, kt.MoreURLs, kt.CASHA256 = url, nil, pin
	tok, err := kt.Token()
	if err == nil {
		err = vol.SetToken(id, tok)
	}
	if err != nil {
		t.Fatal(err)
	}
}
