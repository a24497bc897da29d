package tpm_test

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/rsa"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/keygate/keygate/internal/testutil"
	"github.com/keygate/keygate/tpm"
)

func TestOpenErrors(t *testing.T) {
	dir, err := os.MkdirTemp("", "kgtpm")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	regular := filepath.Join(dir, "file")
	if err := os.WriteFile(regular, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	// A socket whose peer hangs up at once, and one that answers garbage.
	hangup := listen(t, filepath.Join(dir, "hangup"), func(c net.Conn) { c.Close() })
	garbage := listen(t, filepath.Join(dir, "garbage"), func(c net.Conn) {
		defer c.Close()
		c.Write([]byte("HTTP/1.1 400 Bad Request\r\n\r\n"))
	})

	for _, tc := range []struct {
		name, spec string
		want       []string // substrings of the error
		notTPM     bool
	}{
		{"empty", "", []string{"no TPM given", "/dev/tpmrm0, swtpm:SOCKET or sim"}, false},
		{"unknown", "tpm0", []string{`unknown TPM "tpm0": use /dev/tpmrm0, swtpm:SOCKET or sim`}, false},
		{"mssim address", "localhost:2321", []string{"unknown TPM", "swtpm:SOCKET"}, false},
		{"swtpm without socket", "swtpm:", []string{"names no socket"}, false},
		{"missing socket", "swtpm:" + filepath.Join(dir, "nope"), []string{"does not exist", "swtpm socket --tpm2"}, false},
		{"regular file", "swtpm:" + regular, []string{"is not a unix socket"}, false},
		{"peer hangs up", "swtpm:" + hangup, []string{"not a TPM 2.0", "--ctrl"}, true},
		{"peer is not a TPM", "swtpm:" + garbage, []string{"not a TPM 2.0"}, true},
		{"missing device", "/dev/tpm-keygate-missing", []string{"no such device", "vTPM"}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tp, err := tpm.Open(tc.spec)
			if err == nil {
				tp.Close()
				t.Fatalf("Open(%q) succeeded, want an error", tc.spec)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("Open(%q) error %q does not contain %q", tc.spec, err, w)
				}
			}
			if got := errors.Is(err, tpm.ErrNotTPM); got != tc.notTPM {
				t.Errorf("errors.Is(err, ErrNotTPM) = %v, want %v (err: %v)", got, tc.notTPM, err)
			}
		})
	}
}

// listen serves a unix socket with handle until the test ends.
func listen(t *testing.T, path string, handle func(net.Conn)) string {
	t.Helper()
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go handle(c)
		}
	}()
	return path
}

func TestSimulatorIsExclusive(t *testing.T) {
	tp := openChecked(t, "sim")
	if _, err := tpm.Open("sim"); err == nil || !strings.Contains(err.Error(), "already open") {
		t.Fatalf("second Open(sim) = %v, want an 'already open' error", err)
	}
	if tp.Kind() != tpm.Simulator || tp.Spec() != "sim" {
		t.Errorf("Kind, Spec = %v, %q", tp.Kind(), tp.Spec())
	}
}

func TestClosedTPM(t *testing.T) {
	tp, err := tpm.Open("sim")
	if errors.Is(err, tpm.ErrNotSupported) {
		testutil.Skip(t, "sim", err.Error())
	}
	if err != nil {
		t.Fatal(err)
	}
	if err := tp.Close(); err != nil {
		t.Fatal(err)
	}
	if err := tp.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	if _, err := tp.EK(tpm.ECC); err == nil || !strings.Contains(err.Error(), "closed") {
		t.Errorf("EK after Close = %v, want a 'closed' error", err)
	}
}

func TestKeys(t *testing.T) {
	onEachTPM(t, func(t *testing.T, tp *tpm.TPM) {
		for _, alg := range []tpm.Alg{tpm.ECC, tpm.RSA} {
			t.Run(alg.String(), func(t *testing.T) {
				ek, err := tp.EK(alg)
				if err != nil {
					t.Fatal(err)
				}
				ak, err := tp.AK(alg)
				if err != nil {
					t.Fatal(err)
				}
				for name, k := range map[string]*tpm.PublicKey{"EK": ek, "AK": ak} {
					switch k.Key.(type) {
					case *ecdsa.PublicKey:
						if alg != tpm.ECC {
							t.Errorf("%s is ECDSA, want %v", name, alg)
						}
					case *rsa.PublicKey:
						if alg != tpm.RSA {
							t.Errorf("%s is RSA, want %v", name, alg)
						}
					default:
						t.Errorf("%s is %T", name, k.Key)
					}
					pemBytes, err := k.PEM()
					if err != nil {
						t.Fatal(err)
					}
					back, err := tpm.ParsePublicKeyPEM(pemBytes)
					if err != nil {
						t.Fatalf("parse %s PEM: %v", name, err)
					}
					if !back.(interface{ Equal(crypto.PublicKey) bool }).Equal(k.Key) {
						t.Errorf("%s PEM does not round-trip", name)
					}
				}
				// The EK is derived from the endorsement seed: stable.
				again, err := tp.EK(alg)
				if err != nil {
					t.Fatal(err)
				}
				f1, _ := ek.Fingerprint()
				f2, _ := again.Fingerprint()
				if f1 != f2 || len(f1) != 64 {
					t.Errorf("EK fingerprints differ or malformed: %s vs %s", f1, f2)
				}
			})
		}
	})
}

func TestParseAlg(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want tpm.Alg
		ok   bool
	}{{"", tpm.ECC, true}, {"ecc", tpm.ECC, true}, {"P256", tpm.ECC, true}, {"rsa", tpm.RSA, true}, {"dsa", 0, false}} {
		got, err := tpm.ParseAlg(tc.in)
		if (err == nil) != tc.ok || (tc.ok && got != tc.want) {
			t.Errorf("ParseAlg(%q) = %v, %v", tc.in, got, err)
		}
	}
}

func TestParsePublicKeyPEMErrors(t *testing.T) {
	for _, tc := range []struct{ name, in, want string }{
		{"not PEM", "hello", "no PEM block"},
		{"private key", "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", `"PRIVATE KEY"`},
		{"bad DER", "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n", "parse public key"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := tpm.ParsePublicKeyPEM([]byte(tc.in))
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %v, want one containing %q", err, tc.want)
			}
		})
	}
}

func TestPCRsAndExtend(t *testing.T) {
	onEachTPM(t, func(t *testing.T, tp *tpm.TPM) {
		all, err := tp.PCRs()
		if err != nil {
			t.Fatal(err)
		}
		if len(all.GetPcrs()) != tpm.NumPCRs {
			t.Fatalf("PCRs() returned %d PCRs, want %d", len(all.GetPcrs()), tpm.NumPCRs)
		}
		some, err := tp.PCRs(7, 0, 7)
		if err != nil {
			t.Fatal(err)
		}
		if len(some.GetPcrs()) != 2 || !bytes.Equal(some.Pcrs[7], all.Pcrs[7]) {
			t.Errorf("PCRs(7, 0, 7) = %v", some.GetPcrs())
		}

		for _, bad := range []int{-1, tpm.NumPCRs, 100} {
			if err := tp.Extend(bad, []byte("x")); !errors.Is(err, tpm.ErrPCROutOfRange) {
				t.Errorf("Extend(%d) = %v, want ErrPCROutOfRange", bad, err)
			}
			if _, err := tp.PCRs(bad); !errors.Is(err, tpm.ErrPCROutOfRange) {
				t.Errorf("PCRs(%d) = %v, want ErrPCROutOfRange", bad, err)
			}
		}

		mayExtend(t, tp)
		pcr := tpm.WindowPCR
		before := all.Pcrs[uint32(pcr)]
		data := []byte("keygate: unlocked volume 1")
		if err := tp.Extend(pcr, data); err != nil {
			t.Fatal(err)
		}
		after, err := tp.PCRs(pcr)
		if err != nil {
			t.Fatal(err)
		}
		d := sha256.Sum256(data)
		want := sha256.Sum256(append(append([]byte{}, before...), d[:]...))
		if got := after.Pcrs[uint32(pcr)]; !bytes.Equal(got, want[:]) {
			t.Errorf("PCR %d after extend = %s, want SHA-256(old || SHA-256(data)) = %s", pcr, hex.EncodeToString(got), hex.EncodeToString(want[:]))
		}
	})
}

func TestInfoAndEventLog(t *testing.T) {
	onEachTPM(t, func(t *testing.T, tp *tpm.TPM) {
		info, err := tp.Info()
		if err != nil {
			t.Fatal(err)
		}
		if info.Manufacturer == "" || !strings.HasPrefix(info.SpecVersion, "2.0") {
			t.Errorf("Info = %+v, want a manufacturer and spec 2.0", info)
		}
		found := false
		for _, b := range info.PCRBanks {
			found = found || b == "sha256"
		}
		if !found {
			t.Errorf("PCR banks %v lack sha256", info.PCRBanks)
		}
		log, err := tp.EventLog()
		if err != nil {
			t.Fatal(err)
		}
		if tp.Kind() != tpm.Device {
			if log.Available || len(log.Raw) != 0 || log.Reason == "" {
				t.Errorf("EventLog on %v = %+v, want empty and a reason", tp.Kind(), log)
			}
			if info.EventLog || info.EventLogNote == "" {
				t.Errorf("Info on %v says event log %v, note %q", tp.Kind(), info.EventLog, info.EventLogNote)
			}
		}
	})
}

// TestCrossCheckTPM2Tools checks this package against tpm2-tools, an
// independent TSS, on the same swtpm: the EK it derives, and the PCR value
// after Extend.
func TestCrossCheckTPM2Tools(t *testing.T) {
	pcrread := testutil.LookPath(t, "tpm2_pcrread")
	createek := testutil.LookPath(t, "tpm2_createek")
	sock := startSwtpm(t)
	tp, err := tpm.Open("swtpm:" + sock)
	if err != nil {
		t.Fatal(err)
	}
	ek, err := tp.EK(tpm.ECC)
	if err != nil {
		t.Fatal(err)
	}
	ekPEM, _ := ek.PEM()
	if err := tp.Extend(tpm.WindowPCR, []byte("keygate unlocked")); err != nil {
		t.Fatal(err)
	}
	pcrs, err := tp.PCRs(tpm.WindowPCR)
	if err != nil {
		t.Fatal(err)
	}
	tp.Close() // swtpm serves one connection at a time

	tcti := "swtpm:path=" + sock
	out, err := exec.Command(pcrread, "-T", tcti, fmt.Sprintf("sha256:%d", tpm.WindowPCR)).CombinedOutput()
	if err != nil {
		t.Fatalf("tpm2_pcrread: %v: %s", err, out)
	}
	want := hex.EncodeToString(pcrs.Pcrs[uint32(tpm.WindowPCR)])
	if !strings.Contains(strings.ToLower(string(out)), want) {
		t.Errorf("tpm2_pcrread says\n%s\nwant PCR %d = %s", out, tpm.WindowPCR, want)
	}
	dir := t.TempDir()
	if out, err := exec.Command(createek, "-T", tcti, "-G", "ecc", "-c", filepath.Join(dir, "ek.ctx"), "-u", filepath.Join(dir, "ek.pem"), "-f", "pem").CombinedOutput(); err != nil {
		t.Fatalf("tpm2_createek: %v: %s", err, out)
	}
	toolsPEM, err := os.ReadFile(filepath.Join(dir, "ek.pem"))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(toolsPEM, ekPEM) {
		t.Errorf("tpm2_createek EK\n%s\ndiffers from ours\n%s", toolsPEM, ekPEM)
	}
}
