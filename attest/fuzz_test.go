package attest_test

import (
	"bytes"
	"crypto"
	"crypto/ed25519"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/google/go-tpm-tools/client"
	pb "github.com/google/go-tpm-tools/proto/attest"
	"github.com/google/go-tpm-tools/simulator"
	"google.golang.org/protobuf/proto"

	"github.com/keygate/keygate/attest"
	"github.com/keygate/keygate/internal/testutil"
)

// The fuzz targets' fixed world: a MAC key, a clock, an EK and AK made from
// fixed seeds, and the nonce of the recorded attestations in testdata.
var (
	fuzzIssued = time.Date(2026, 6, 1, 12, 0, 0, 0, time.UTC)
	fuzzEK     = ed25519.NewKeyFromSeed(bytes.Repeat([]byte{1}, 32)).Public()
	fuzzAK     = ed25519.NewKeyFromSeed(bytes.Repeat([]byte{2}, 32)).Public()
	fuzzNonce  = []byte{0x90, 0x09}
)

const (
	simAttestation = "sim-ecc-nonce9009.pb"    // simulator, fixed seed 1, no event log
	cosAttestation = "gce-cos-85-nonce9009.pb" // GCE COS 85, UEFI log with GRUB
)

func fuzzChallenger(t testing.TB) *attest.Challenger {
	ch, err := attest.NewChallenger(testKey, attest.WithClock(func() time.Time { return fuzzIssued }))
	if err != nil {
		t.Fatal(err)
	}
	return ch
}

// FuzzCheckToken feeds token strings from outside to Check. It must never
// panic, must fail with exactly one of the challenge sentinels, and may
// succeed only for a token bound to the fixed binding.
func FuzzCheckToken(f *testing.F) {
	ch := fuzzChallenger(f)
	_, tok, err := ch.Issue("vm-fuzz", "vol-fuzz", fuzzEK, fuzzAK)
	if err != nil {
		f.Fatal(err)
	}
	f.Add(tok)
	f.Add("v1..")
	f.Add("")
	sentinels := []error{attest.ErrChallengeMalformed, attest.ErrChallengeMAC, attest.ErrChallengeBinding, attest.ErrChallengeExpired}
	f.Fuzz(func(t *testing.T, token string) {
		cl, err := ch.Check(token, "vm-fuzz", "vol-fuzz", fuzzEK, fuzzAK, fuzzIssued.Add(time.Second))
		if err != nil {
			n := 0
			for _, s := range sentinels {
				if errors.Is(err, s) {
					n++
				}
			}
			if n != 1 {
				t.Fatalf("error %v matches %d sentinels, want 1", err, n)
			}
			return
		}
		if cl.VM != "vm-fuzz" || cl.Volume != "vol-fuzz" || len(cl.Nonce) != attest.NonceSize {
			t.Fatalf("accepted token with claims %+v", cl)
		}
	})
}

// FuzzParsePolicy feeds policy JSON from outside to ParsePolicy. A policy it
// accepts must validate, and marshal to JSON that parses to the same bytes.
func FuzzParsePolicy(f *testing.F) {
	f.Add([]byte(`{"pcrs":{"7":["` + hexA + `","` + hexB + `"]},"secure_boot":true,"kernel_cmdline":{"contains":["ro"]}}`))
	f.Add([]byte(`{"pcrs":{}}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		p, err := attest.ParsePolicy(data)
		if err != nil {
			return
		}
		if err := p.Validate(); err != nil {
			t.Fatalf("parsed policy does not validate: %v", err)
		}
		b1, err := json.Marshal(p)
		if err != nil {
			t.Fatalf("marshal: %v", err)
		}
		q, err := attest.ParsePolicy(b1)
		if err != nil {
			t.Fatalf("reparse %s: %v", b1, err)
		}
		b2, _ := json.Marshal(q)
		if !bytes.Equal(b1, b2) {
			t.Fatalf("round trip differs:\n%s\n%s", b1, b2)
		}
	})
}

// FuzzVerifyAttestation feeds attestation protobuf bytes from outside to
// Verify and Learn, trusting the AKs of the recorded attestations, so that
// mutations get past the AK check. They must never panic, and a success
// must come with the quoted PCRs the policy asked for.
//
// Inputs that reach the event log parser take milliseconds each, so limit
// minimization or the run stalls minimizing 30 KB inputs; and give
// -fuzztime as a count, since go1.26 may report a spurious "context
// deadline exceeded" at the end of a timed run (golang/go#75804):
//
//	go test ./attest -run XXX -fuzz FuzzVerifyAttestation -fuzztime 120000x -fuzzminimizetime 10x
func FuzzVerifyAttestation(f *testing.F) {
	var aks []crypto.PublicKey
	for _, name := range []string{simAttestation, cosAttestation} {
		att := recorded(f, name)
		aks = append(aks, recordedAK(f, att))
		b, err := os.ReadFile(filepath.Join("testdata", name))
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	sim := recorded(f, simAttestation)
	learned, _, err := attest.Learn(sim, attest.VerifyOpts{Nonce: fuzzNonce, TrustedAKs: aks}, []int{0, 7, 8})
	if err != nil {
		f.Fatalf("learn from %s: %v", simAttestation, err)
	}
	withRules := *learned
	withRules.SecureBoot = boolp(true)
	withRules.KernelCmdline = &attest.CmdlineRule{Contains: []string{"ro"}}
	policies := []*attest.Policy{learned, &withRules}
	f.Fuzz(func(t *testing.T, data []byte) {
		att := &pb.Attestation{}
		if err := proto.Unmarshal(data, att); err != nil {
			return
		}
		for _, p := range policies {
			res, err := attest.Verify(att, attest.VerifyOpts{Nonce: fuzzNonce, TrustedAKs: aks, Policy: p})
			if err == nil {
				for i := range p.PCRs {
					if _, ok := res.PCRs[i]; !ok {
						t.Fatalf("verified without quoted PCR %d", i)
					}
				}
			} else if !errors.Is(err, attest.ErrEvidence) && !errors.Is(err, attest.ErrPolicyDenied) {
				t.Fatalf("error %v is neither ErrEvidence nor ErrPolicyDenied", err)
			}
		}
		attest.Learn(att, attest.VerifyOpts{Nonce: fuzzNonce, TrustedAKs: aks}, nil)
	})
}

// TestWriteFuzzSeeds regenerates testdata/sim-ecc-nonce9009.pb and the
// committed seed corpora under testdata/fuzz. Run it by hand:
//
//	KEYGATE_WRITE_SEEDS=1 go test ./attest -run TestWriteFuzzSeeds
func TestWriteFuzzSeeds(t *testing.T) {
	if os.Getenv("KEYGATE_WRITE_SEEDS") == "" {
		t.Skip("skipping: set KEYGATE_WRITE_SEEDS=1 to regenerate testdata and fuzz seeds")
	}
	// The simulator attestation: fixed seed, so the AK is the same each time.
	s, err := simulator.GetWithFixedSeedInsecure(1)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	ak, err := client.AttestationKeyECC(s)
	if err != nil {
		t.Fatal(err)
	}
	defer ak.Close()
	att, err := ak.Attest(client.AttestOpts{Nonce: fuzzNonce, TCGEventLog: []byte{}})
	if err != nil {
		t.Fatal(err)
	}
	simBytes, err := proto.Marshal(att)
	if err != nil {
		t.Fatal(err)
	}
	write(t, filepath.Join("testdata", simAttestation), simBytes)
	cosBytes, err := os.ReadFile(filepath.Join("testdata", cosAttestation))
	if err != nil {
		t.Fatal(err)
	}
	panicBytes, err := os.ReadFile(filepath.Join("testdata", "gce-cos-85-event-type-panic.pb"))
	if err != nil {
		t.Fatal(err)
	}
	ch := fuzzChallenger(t)
	_, tok, _ := ch.Issue("vm-fuzz", "vol-fuzz", fuzzEK, fuzzAK)
	_, otherTok, _ := ch.Issue("vm-other", "vol-fuzz", fuzzEK, fuzzAK)
	parts := strings.Split(tok, ".")
	seeds := map[string][]string{
		"FuzzCheckToken": {
			"string(" + strconv.Quote(tok) + ")",
			"string(" + strconv.Quote(otherTok) + ")",
			"string(" + strconv.Quote("v1."+parts[1]+"."+parts[1]) + ")",
			"string(" + strconv.Quote("v1."+parts[1][:10]+"."+parts[2]) + ")",
			"string(" + strconv.Quote("v2."+parts[1]+"."+parts[2]) + ")",
			`string("v1..")`,
		},
		"FuzzParsePolicy": {
			"[]byte(" + strconv.Quote(`{"pcrs":{"0":["`+hexA+`"],"7":["`+hexA+`","`+hexB+`"]},"secure_boot":true,"kernel_cmdline":{"equals":"ro quiet","contains":["ro"]}}`) + ")",
			"[]byte(" + strconv.Quote(`{"pcrs":{"07":["`+hexA+`"]}}`) + ")",
			"[]byte(" + strconv.Quote(`{"pcrs":{"7":[]},"kernel_cmdline":{}}`) + ")",
			"[]byte(" + strconv.Quote(`{"pcrs":{}}`) + ")",
		},
		"FuzzVerifyAttestation": {
			"[]byte(" + strconv.Quote(string(simBytes)) + ")",
			"[]byte(" + strconv.Quote(string(cosBytes)) + ")",
			"[]byte(" + strconv.Quote(string(panicBytes)) + ")",
		},
	}
	for target, list := range seeds {
		dir := filepath.Join("testdata", "fuzz", target)
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		for i, v := range list {
			write(t, filepath.Join(dir, fmt.Sprintf("seed-%d", i)), []byte("go test fuzz v1\n"+v+"\n"))
		}
	}
}

func write(t *testing.T, path string, b []byte) {
	t.Helper()
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
}

// TestFuzzSeeds checks that every fuzz target has committed seeds and that
// the recorded attestations still verify in full, so the fuzzers start
// from inputs that reach every check.
func TestFuzzSeeds(t *testing.T) {
	for _, target := range []string{"FuzzCheckToken", "FuzzParsePolicy", "FuzzVerifyAttestation"} {
		testutil.Glob(t, filepath.Join("testdata", "fuzz", target, "seed-*"))
	}
	for _, name := range []string{simAttestation, cosAttestation} {
		t.Run(name, func(t *testing.T) {
			att := recorded(t, name)
			opts := attest.VerifyOpts{Nonce: fuzzNonce, TrustedAKs: []crypto.PublicKey{recordedAK(t, att)}}
			p, _, err := attest.Learn(att, opts, []int{0, 7})
			if err != nil {
				t.Fatalf("Learn: %v", err)
			}
			opts.Policy = p
			if _, err := attest.Verify(att, opts); err != nil {
				t.Fatalf("Verify: %v", err)
			}
		})
	}
}
