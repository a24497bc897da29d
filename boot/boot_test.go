package boot

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"math/big"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/keygate/keygate/disk/ninep"
	"github.com/keygate/keygate/keysvc/api"

	"github.com/keygate/keygate/disk"
	"github.com/keygate/keygate/disk/luks2"
	"github.com/keygate/keygate/internal/testutil"
	"github.com/keygate/keygate/tpm"
)

// cfg is the Config the tests start from.
func (e *env) cfg(tp *tpm.TPM, vm, img string, ev *events) Config {
	c := Config{KeysvcURL: e.url(), CA: e.ca, VM: vm, Image: img, TPM: tp, Log: quietLog(),
		Poll: 50 * time.Millisecond, RetryMin: 20 * time.Millisecond, RetryMax: 200 * time.Millisecond}
	if ev != nil {
		c.OnEvent = ev.on
	}
	return c
}

func TestBoot(t *testing.T) {
	e := startEnv(t)
	tests := []struct {
		name string
		// before runs after enrollment and volume creation, before Run.
		before func(t *testing.T, tp *tpm.TPM, img string)
		// cfg adjusts the Config.
		cfg func(c *Config)
		// wantErr, when set, is checked against Run's error; check then
		// looks at the error's details.
		wantErr error
		check   func(t *testing.T, err error)
	}{
		{name: "unlocks"},
		{
			name:    "denied-after-pcr-change",
			before:  func(t *testing.T, tp *tpm.TPM, _ string) { tp.Extend(7, []byte("a new boot loader")) },
			wantErr: ErrRefused,
			check: func(t *testing.T, err error) {
				var r *Refusal
				if !errors.As(err, &r) || r.Denial == nil || len(r.Denial.Mismatches) != 1 || r.Denial.Mismatches[0].PCR != 7 || r.Denial.Mismatches[0].Got == "" {
					t.Fatalf("want a denial naming PCR 7 with its value, got %v", err)
				}
				if !strings.Contains(err.Error(), "PCR 7: got "+r.Denial.Mismatches[0].Got+", allowed "+r.Denial.Mismatches[0].Allowed[0]) {
					t.Fatalf("error does not print the diagnostics: %v", err)
				}
			},
		},
		{
			name: "erased",
			before: func(t *testing.T, _ *tpm.TPM, img string) {
				e.admin(t, "POST", "/v1/admin/volumes/"+volID(img)+"/erase", nil, http.StatusOK)
			},
			wantErr: ErrRefused,
			check:   wantReason(api.ReasonErased),
		},
		{
			name: "revoked-vm",
			before: func(t *testing.T, _ *tpm.TPM, img string) {
				e.admin(t, "POST", "/v1/admin/vms/"+vmOf(img)+"/revoke", nil, http.StatusOK)
			},
			wantErr: ErrRefused,
			check:   wantReason(api.ReasonRevoked),
		},
		{
			name:    "wrong-ca",
			cfg:     func(c *Config) { c.CA = otherCA(t) },
			wantErr: nil,
			check: func(t *testing.T, err error) {
				if err == nil || !strings.Contains(err.Error(), "not the CA the volume's keygate token pins") {
					t.Fatalf("want the --ca/token mismatch refused, got %v", err)
				}
			},
		},
		{
			name: "mitm-certificate",
			cfg: func(c *Config) {
				addr := mitm(t)
				c.KeysvcURL = "https://" + addr
			},
			wantErr: ErrTLS,
		},
		{
			// keysvc serves its CA after its leaf, so the token's CA
			// fingerprint alone is enough to trust it.
			name: "token-pin-only",
			cfg:  func(c *Config) { c.CA = nil },
		},
		{
			name: "lock-on-alert-without-monitor",
			cfg:  func(c *Config) { c.OnAlert = AlertLock },
			check: func(t *testing.T, err error) {
				if err == nil || !strings.Contains(err.Error(), "--on-alert lock needs --monitor") {
					t.Fatalf("want --on-alert lock without --monitor refused, got %v", err)
				}
			},
		},
		{
			name: "unknown-alert-action",
			cfg:  func(c *Config) { c.Monitor, c.OnAlert = true, "panic" },
			check: func(t *testing.T, err error) {
				if err == nil || !strings.Contains(err.Error(), `on-alert "panic": use log or lock`) {
					t.Fatalf("want an unknown --on-alert refused, got %v", err)
				}
			},
		},
		{
			name:    "volume-not-the-tokens",
			cfg:     func(c *Config) { c.Volume = "another" },
			wantErr: nil,
			check: func(t *testing.T, err error) {
				if err == nil || !strings.Contains(err.Error(), "is not the volume") {
					t.Fatalf("want --volume/token mismatch, got %v", err)
				}
			},
		},
	}
	for i, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			tp := openSim(t)
			vm := "vm" + string(rune('a'+i))
			e.enroll(t, tp, vm, false)
			img := e.volume(t, vm, vm+"-vol")
			if tc.before != nil {
				tc.before(t, tp, img)
			}
			c := e.cfg(tp, vm, img, nil)
			c.MaxWait = 5 * time.Second
			if tc.cfg != nil {
				tc.cfg(&c)
			}
			b, err := Run(context.Background(), c)
			if b != nil {
				defer b.Close()
			}
			if tc.wantErr == nil && tc.check == nil {
				if err != nil {
					t.Fatalf("run: %v", err)
				}
				roundTrip(t, b.FS())
				return
			}
			if b != nil {
				t.Fatal("Run returned a Boot and an error")
			}
			if tc.wantErr != nil && !errors.Is(err, tc.wantErr) {
				t.Fatalf("run: %v, want %v", err, tc.wantErr)
			}
			if tc.check != nil {
				tc.check(t, err)
			}
		})
	}
}

// volID and vmOf undo the naming of TestBoot: IMAGE is DIR/VM-vol.img.
func volID(img string) string { return strings.TrimSuffix(filepath.Base(img), ".img") }
func vmOf(img string) string  { return strings.TrimSuffix(volID(img), "-vol") }

func wantReason(reason string) func(t *testing.T, err error) {
	return func(t *testing.T, err error) {
		var r *Refusal
		if !errors.As(err, &r) || r.Reason != reason {
			t.Fatalf("want refusal %q, got %v", reason, err)
		}
	}
}

func roundTrip(t *testing.T, fs *disk.FS) {
	t.Helper()
	const text = "written after an attested unlock\n"
	if err := fs.Put("/note.txt", strings.NewReader(text), int64(len(text))); err != nil {
		t.Fatalf("put: %v", err)
	}
	var got bytes.Buffer
	if _, err := fs.Get("/note.txt", &got); err != nil || got.String() != text {
		t.Fatalf("get: %q %v", got.String(), err)
	}
}

// otherCA is the PEM of a CA that has nothing to do with the key service.
func otherCA(t testing.TB) []byte {
	t.Helper()
	cert, _, _ := selfSigned(t)
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: cert.Raw})
}

func selfSigned(t testing.TB) (*x509.Certificate, *ecdsa.PrivateKey, tls.Certificate) {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "mitm"}, NotBefore: time.Now().Add(-time.Hour),
		NotAfter: time.Now().Add(time.Hour), IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}, IPAddresses: []net.IP{net.ParseIP("127.0.0.1")}, DNSNames: []string{"localhost"}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &k.PublicKey, k)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	return cert, k, tls.Certificate{Certificate: [][]byte{der}, PrivateKey: k}
}

// mitm serves TLS 1.3 on loopback with a certificate valid for 127.0.0.1
// but from another CA, as a machine in the middle would, and answers
// anything it is sent with a fake key service refusal.
func mitm(t testing.TB) string {
	t.Helper()
	_, _, pair := selfSigned(t)
	ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{pair}, MinVersion: tls.VersionTLS13})
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		t.Errorf("the client sent a request through a MITM certificate: %s %s", r.Method, r.URL.Path)
		w.WriteHeader(http.StatusForbidden)
	}), ErrorLog: nil}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return ln.Addr().String()
}

// TestSecondUnlockInOneBoot: after an unlock, PCR 15 is extended, so the
// key service refuses a second attempt in the same boot with diagnostics
// naming PCR 15 (the policy includes it), before the TPM is even asked.
func TestSecondUnlockInOneBoot(t *testing.T) {
	e := startEnv(t)
	tp := openSim(t)
	e.enroll(t, tp, "once", false)
	img := e.volume(t, "once", "once-vol")
	b, err := Run(context.Background(), e.cfg(tp, "once", img, nil))
	if err != nil {
		t.Fatalf("first unlock: %v", err)
	}
	if err := b.Close(); err != nil {
		t.Fatalf("close: %v", err)
	}
	_, err = Run(context.Background(), e.cfg(tp, "once", img, nil))
	var r *Refusal
	if !errors.As(err, &r) || r.Denial == nil {
		t.Fatalf("second unlock: %v, want a policy denial", err)
	}
	if len(r.Denial.Mismatches) != 1 || r.Denial.Mismatches[0].PCR != tpm.WindowPCR {
		t.Fatalf("denial names %+v, want PCR %d only", r.Denial.Mismatches, tpm.WindowPCR)
	}
	if m := r.Denial.Mismatches[0]; m.Allowed[0] != strings.Repeat("00", 32) || m.Got == "" || m.Got == m.Allowed[0] {
		t.Fatalf("PCR 15 diagnostics: %+v", r.Denial.Mismatches[0])
	}
}

// TestKeysvcDownAtBoot: with the key service stopped, Run waits and says
// so; once the service is back on the same address, the unlock completes.
func TestKeysvcDownAtBoot(t *testing.T) {
	e := startEnv(t)
	tp := openSim(t)
	e.enroll(t, tp, "patient", false)
	img := e.volume(t, "patient", "patient-vol")
	e.stop(t)
	ev := newEvents()
	type result struct {
		b   *Boot
		err error
	}
	done := make(chan result, 1)
	go func() {
		b, err := Run(context.Background(), e.cfg(tp, "patient", img, ev))
		done <- result{b, err}
	}()
	w := ev.wait(t, EventWaiting)
	if !strings.Contains(w.Message, "unreachable") || !strings.Contains(w.Message, "retrying in") {
		t.Fatalf("console line %q does not say what is happening", w.Message)
	}
	ev.wait(t, EventWaiting) // and it keeps trying
	e.start(t)
	r := <-done
	if r.err != nil {
		t.Fatalf("run after the service returned: %v", r.err)
	}
	defer r.b.Close()
	roundTrip(t, r.b.FS())
}

// TestMaxWait: with MaxWait, an unreachable service is given up on with
// an error that says so, and nothing is unlocked.
func TestMaxWait(t *testing.T) {
	e := startEnv(t)
	tp := openSim(t)
	e.enroll(t, tp, "impatient", false)
	img := e.volume(t, "impatient", "impatient-vol")
	e.stop(t)
	c := e.cfg(tp, "impatient", img, nil)
	c.MaxWait = 300 * time.Millisecond
	_, err := Run(context.Background(), c)
	var ue *UnreachableError
	if !errors.As(err, &ue) || !strings.Contains(err.Error(), "gave up") {
		t.Fatalf("run: %v, want a give-up on an unreachable service", err)
	}
}

// TestOfflineProvisioned: a volume made offline (`keygate disk create
// --key-file F`, then `keysvc volume import --key-file F`) has no keygate
// token; it unlocks when --keysvc, --volume and --ca are given, and says
// what is missing when they are not.
func TestOfflineProvisioned(t *testing.T) {
	e := startEnv(t)
	tp := openSim(t)
	e.enroll(t, tp, "offline", false)
	uk := bytes.Repeat([]byte{7}, 32) // a test key file's bytes
	img := filepath.Join(t.TempDir(), "v.img")
	key, err := disk.NewKey(uk)
	if err != nil {
		t.Fatal(err)
	}
	_, err = disk.CreateImage(img, key, disk.CreateOptions{Size: 64 << 20, FS: disk.Ext4, PBKDF: disk.PBKDF2})
	key.Destroy()
	if err != nil {
		t.Fatal(err)
	}
	e.admin(t, "POST", "/v1/admin/volumes", api.VolumeRequest{ID: "offline-vol", VM: "offline", Key: uk}, http.StatusCreated)
	c := e.cfg(tp, "offline", img, nil)
	if _, err := Run(context.Background(), c); err == nil || !strings.Contains(err.Error(), "no keygate token, so --keysvc and --volume are required") {
		t.Fatalf("run without --volume: %v", err)
	}
	c.Volume = "offline-vol"
	b, err := Run(context.Background(), c)
	if err != nil {
		t.Fatalf("run: %v", err)
	}
	defer b.Close()
	roundTrip(t, b.FS())
}

// TestStopWhileWaiting: cancelling the context while the key service is
// unreachable ends Run with the context's error and nothing unlocked.
func TestStopWhileWaiting(t *testing.T) {
	e := startEnv(t)
	tp := openSim(t)
	e.enroll(t, tp, "stopped", false)
	img := e.volume(t, "stopped", "stopped-vol")
	e.stop(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	ev := newEvents()
	c := e.cfg(tp, "stopped", img, ev)
	c.OnEvent = func(x Event) {
		ev.on(x)
		if x.Kind == EventWaiting {
			cancel()
		}
	}
	b, err := Run(ctx, c)
	if b != nil || !errors.Is(err, context.Canceled) || !strings.Contains(err.Error(), "stopped while waiting for the key service") {
		t.Fatalf("run: %v %v, want a cancelled wait", b, err)
	}
}

// TestWhileServing covers what happens after the unlock: the 9P export,
// an outage of the key service, a revoke and an erase.
func TestWhileServing(t *testing.T) {
	e := startEnv(t)
	tests := []struct {
		name string
		act  func(t *testing.T, b *Boot, ev *events, vm, vol string)
	}{
		{"9p-read-write", func(t *testing.T, b *Boot, ev *events, vm, vol string) {
			root, done := p9Client(t, b.Socket())
			defer done()
			data := bytes.Repeat([]byte("keygate "), 40000) // 320 KB: several 9P messages
			if err := ninep.WriteFile(root, "big.bin", data); err != nil {
				t.Fatalf("9P write: %v", err)
			}
			got, err := ninep.ReadFile(root, "big.bin")
			if err != nil || !bytes.Equal(got, data) {
				t.Fatalf("9P read back %d bytes (%v), want %d", len(got), err, len(data))
			}
			var fsGot bytes.Buffer
			if _, err := b.FS().Get("/big.bin", &fsGot); err != nil || sha256.Sum256(fsGot.Bytes()) != sha256.Sum256(data) {
				t.Fatalf("the file written over 9P is not in the volume: %v", err)
			}
		}},
		{"keysvc-down-while-serving", func(t *testing.T, b *Boot, ev *events, vm, vol string) {
			e.stop(t)
			o := ev.wait(t, EventOutage)
			if !strings.Contains(o.Message, "stays unlocked") {
				t.Fatalf("outage line %q", o.Message)
			}
			roundTrip(t, b.FS()) // the volume keeps working
			root, done := p9Client(t, b.Socket())
			if err := ninep.WriteFile(root, "during-outage", []byte("ok")); err != nil {
				t.Fatalf("9P write during the outage: %v", err)
			}
			done()
			e.start(t)
			ev.wait(t, EventReconnected)
			select {
			case <-b.Done():
				t.Fatal("the volume was locked by an outage")
			default:
			}
		}},
		{"revoke-locks", func(t *testing.T, b *Boot, ev *events, vm, vol string) {
			e.admin(t, "POST", "/v1/admin/vms/"+vm+"/revoke", nil, http.StatusOK)
			wantLocked(t, b, ev)
		}},
		{"erase-locks", func(t *testing.T, b *Boot, ev *events, vm, vol string) {
			e.admin(t, "POST", "/v1/admin/volumes/"+vol+"/erase", nil, http.StatusOK)
			wantLocked(t, b, ev)
		}},
	}
	for i, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			tp := openSim(t)
			vm := "srv" + string(rune('a'+i))
			e.enroll(t, tp, vm, false)
			img := e.volume(t, vm, vm+"-vol")
			ev := newEvents()
			c := e.cfg(tp, vm, img, ev)
			c.Serve9P = socketPath(t)
			b, err := Run(context.Background(), c)
			if err != nil {
				t.Fatalf("run: %v", err)
			}
			defer b.Close()
			ev.wait(t, EventServing)
			tc.act(t, b, ev, vm, vm+"-vol")
		})
	}
}

// wantLocked waits for the lock and checks its consequences: Wait says
// revoked, the socket is gone, the filesystem refuses work.
func wantLocked(t *testing.T, b *Boot, ev *events) {
	t.Helper()
	l := ev.wait(t, EventLocked)
	if !errors.Is(l.Err, ErrRevoked) || !errors.Is(b.Wait(), ErrRevoked) {
		t.Fatalf("lock reason %v / %v, want ErrRevoked", l.Err, b.Wait())
	}
	if _, err := os.Lstat(b.Socket()); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("9P socket still there after the lock: %v", err)
	}
	if _, err := net.Dial("unix", b.Socket()); err == nil {
		t.Fatal("9P still answers after the lock")
	}
	if err := b.FS().Put("/after", strings.NewReader("x"), 1); err == nil {
		t.Fatal("the filesystem still takes writes after the lock")
	}
}

// TestInitIfBlank: a blank image is provisioned through the key service
// and formatted; an image holding data, or a blank one without the flag,
// is left exactly as it was.
func TestInitIfBlank(t *testing.T) {
	e := startEnv(t)
	tests := []struct {
		name         string
		fill         func(f *os.File) error
		init         bool
		provisioning bool
		wantErr      string // "" = provisions
	}{
		{name: "blank", init: true, provisioning: true},
		{name: "holds-data", init: true, provisioning: true, wantErr: "holds data",
			fill: func(f *os.File) error { _, err := f.WriteAt([]byte("an old filesystem"), 1<<20); return err }},
		{name: "data-at-the-end", init: true, provisioning: true, wantErr: "holds data",
			fill: func(f *os.File) error { _, err := f.WriteAt([]byte("GPT backup"), 64<<20-512); return err }},
		{name: "blank-without-flag", init: false, provisioning: true, wantErr: "pass --init-if-blank"},
		{name: "policy-forbids", init: true, provisioning: false, wantErr: "may not provision"},
	}
	for i, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			tp := openSim(t)
			vm := "init" + string(rune('a'+i))
			e.enroll(t, tp, vm, tc.provisioning)
			img := filepath.Join(t.TempDir(), "blank.img")
			f, err := os.Create(img)
			if err == nil {
				err = f.Truncate(64 << 20)
			}
			if err == nil && tc.fill != nil {
				err = tc.fill(f)
			}
			if err := errors.Join(err, f.Close()); err != nil {
				t.Fatal(err)
			}
			before := fileSum(t, img)
			c := e.cfg(tp, vm, img, nil)
			c.Volume, c.InitIfBlank = vm+"-data", tc.init
			b, err := Run(context.Background(), c)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("run: %v, want an error saying %q", err, tc.wantErr)
				}
				if fileSum(t, img) != before {
					t.Fatal("the image was changed")
				}
				return
			}
			if err != nil {
				t.Fatalf("run: %v", err)
			}
			roundTrip(t, b.FS())
			if err := b.Close(); err != nil {
				t.Fatal(err)
			}
			in, err := disk.Inspect(img)
			if err != nil {
				t.Fatalf("inspect the provisioned image: %v", err)
			}
			var hasToken bool
			for _, tok := range in.Tokens {
				hasToken = hasToken || tok.Type == "keygate"
			}
			if !hasToken {
				t.Fatalf("no keygate token in the provisioned header: %+v", in.Tokens)
			}
			// The volume now exists: a second provisioning is refused, and the
			// image is not blank any more, so the flag changes nothing.
			if _, err := Run(context.Background(), c); !errors.Is(err, ErrRefused) {
				t.Fatalf("second boot in the same boot: %v, want a refusal (PCR 15)", err)
			}
		})
	}
}

func fileSum(t *testing.T, path string) [32]byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return sha256.Sum256(b)
}

// TestCreateVolumeFailures: a create that cannot register at the key
// service leaves no image and no temporary file behind.
func TestCreateVolumeFailures(t *testing.T) {
	e := startEnv(t)
	tp := openSim(t)
	e.enroll(t, tp, "maker", false)
	tests := []struct {
		name string
		cc   func(cc *CreateConfig)
		want string
	}{
		{"unknown-vm", func(cc *CreateConfig) { cc.VM = "nobody" }, "not enrolled"},
		{"bad-token", func(cc *CreateConfig) { cc.Token = strings.Repeat("x", 64) }, "401"},
		{"wrong-ca", func(cc *CreateConfig) { cc.CA = otherCA(t) }, "certificate"},
		{"volume-exists", func(cc *CreateConfig) { cc.Volume = "taken" }, "409"},
		{"http-url", func(cc *CreateConfig) { cc.KeysvcURL = "http://" + e.vmAddr }, "https"},
	}
	e.volume(t, "maker", "taken")
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			cc := CreateConfig{Image: filepath.Join(dir, "v.img"), KeysvcURL: e.url(), AdminURL: "https://" + e.adminAddr,
				CA: e.ca, Token: e.token, VM: "maker", Volume: "v-" + tc.name, Options: disk.CreateOptions{Size: 64 << 20, FS: disk.Ext4}}
			tc.cc(&cc)
			_, err := CreateVolume(context.Background(), cc)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("create: %v, want an error with %q", err, tc.want)
			}
			if left, _ := os.ReadDir(dir); len(left) != 0 {
				t.Fatalf("left behind: %v", left)
			}
		})
	}
}

// TestFormatOpensInCryptsetup: the header keygate writes for a UK keyslot
// (pbkdf2 keyslot, cryptsetup's minimum digest count, keygate token)
// opens in cryptsetup with the UK as key file.
func TestFormatOpensInCryptsetup(t *testing.T) {
	cs := testutil.LookPath(t, "cryptsetup")
	dir := t.TempDir()
	img, keyFile := filepath.Join(dir, "v.img"), filepath.Join(dir, "uk")
	uk := bytes.Repeat([]byte{0x42}, api.UKSize) // a test key, not a secret
	if err := os.WriteFile(keyFile, uk, 0o600); err != nil {
		t.Fatal(err)
	}
	tok := luks2.KeygateToken{URL: "https://keysvc.example:8443", VolumeID: "v", CASHA256: strings.Repeat("ab", 32)}
	if _, err := createImage(img, uk, tok, disk.CreateOptions{Size: 64 << 20, FS: disk.FAT32}); err != nil {
		t.Fatal(err)
	}
	for _, args := range [][]string{
		{"open", "--test-passphrase", "--key-file", keyFile, img},
		{"token", "export", "--token-id", "0", img},
	} {
		out, err := exec.Command(cs, args...).CombinedOutput()
		if err != nil {
			t.Fatalf("cryptsetup %s: %v\n%s", strings.Join(args, " "), err, out)
		}
		if args[0] == "token" && !strings.Contains(string(out), `"keygate_volume":"v"`) {
			t.Fatalf("cryptsetup sees token %s", out)
		}
	}
	wrong := filepath.Join(dir, "wrong")
	os.WriteFile(wrong, bytes.Repeat([]byte{0x43}, api.UKSize), 0o600)
	out, err := exec.Command(cs, "open", "--test-passphrase", "--key-file", wrong, img).CombinedOutput()
	if err == nil || !strings.Contains(string(out), "No key available") {
		t.Fatalf("cryptsetup with a wrong key: %v %s", err, out)
	}
}
