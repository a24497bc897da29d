package keysvc

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"errors"
	"os"
	"strings"
	"testing"
	"time"

	pb "github.com/google/go-tpm-tools/proto/attest"
	"github.com/google/go-tpm/legacy/tpm2"
	"google.golang.org/protobuf/proto"

	"github.com/keygate/keygate/attest"
)

// TestVerifyServing: with a real UEFI event log (a recorded GCE
// attestation), a log that no longer replays to the quoted PCRs (what a
// measurement made after boot does) is a lock when the quote itself is the
// enrolled AK's over the nonce, and bad evidence when it is not.
func TestVerifyServing(t *testing.T) {
	raw, err := os.ReadFile("../attest/testdata/gce-cos-85-nonce9009.pb")
	if err != nil {
		t.Fatal(err)
	}
	att := &pb.Attestation{}
	if err := proto.Unmarshal(raw, att); err != nil {
		t.Fatal(err)
	}
	pub, err := tpm2.DecodePublic(att.GetAkPub())
	if err != nil {
		t.Fatal(err)
	}
	ak, err := pub.Key()
	if err != nil {
		t.Fatal(err)
	}
	opts := attest.VerifyOpts{Nonce: []byte{0x90, 0x09}, TrustedAKs: []crypto.PublicKey{ak}}
	learned, _, err := attest.Learn(att, opts, []int{0, 2, 4, 7, 8, 9})
	if err != nil {
		t.Fatal(err)
	}
	truncated := proto.Clone(att).(*pb.Attestation)
	truncated.EventLog = truncated.EventLog[:len(truncated.EventLog)-10]
	otherPCR8 := *learned
	otherPCR8.PCRs = map[int][][]byte{8: {bytes.Repeat([]byte{3}, 32)}, 9: learned.PCRs[9]}
	for _, tc := range []struct {
		name     string
		att      *pb.Attestation
		policy   *attest.Policy
		nonce    []byte
		aks      []crypto.PublicKey
		lock     bool
		lockPCRs []int
		reason   string
		err      error
	}{
		{name: "unchanged", att: att, policy: learned},
		{name: "off-policy", att: att, policy: &otherPCR8, lock: true, lockPCRs: []int{8}},
		{name: "log-no-longer-replays", att: truncated, policy: learned, lock: true, reason: "no longer replays"},
		{name: "log-and-policy", att: truncated, policy: &otherPCR8, lock: true, lockPCRs: []int{8}, reason: "no longer replays"},
		{name: "wrong-nonce", att: truncated, policy: learned, nonce: []byte{1}, err: attest.ErrEvidence},
		{name: "other-ak", att: truncated, policy: learned, aks: []crypto.PublicKey{otherKey(t)}, err: attest.ErrUntrustedAK},
	} {
		t.Run(tc.name, func(t *testing.T) {
			o := opts
			o.Policy = tc.policy
			if tc.nonce != nil {
				o.Nonce = tc.nonce
			}
			if tc.aks != nil {
				o.TrustedAKs = tc.aks
			}
			d, err := verifyServing(tc.att, o)
			if tc.err != nil {
				if !errors.Is(err, tc.err) || d != nil {
					t.Fatalf("verifyServing: %v %v, want %v", d, err, tc.err)
				}
				return
			}
			if err != nil || (d != nil) != tc.lock {
				t.Fatalf("verifyServing: denial %v, err %v; want lock %v", d, err, tc.lock)
			}
			if d == nil {
				return
			}
			var pcrs []int
			for _, m := range d.Mismatches {
				pcrs = append(pcrs, m.PCR)
			}
			if len(pcrs) != len(tc.lockPCRs) || (len(pcrs) > 0 && pcrs[0] != tc.lockPCRs[0]) {
				t.Errorf("denial names PCRs %v, want %v", pcrs, tc.lockPCRs)
			}
			if !strings.Contains(d.Reason, tc.reason) {
				t.Errorf("reason %q, want it to say %q", d.Reason, tc.reason)
			}
		})
	}
}

// otherKey is an AK public key that signed nothing here.
func otherKey(t *testing.T) crypto.PublicKey {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k.Public()
}

// TestLockedSessionsForgotten: a locked session stays locked until
// forgetAfter has passed, then flagStale forgets it (as docs/protocol.md
// says: per replica, for 24 hours).
func TestLockedSessionsForgotten(t *testing.T) {
	ss := newServingSessions()
	t0 := time.Unix(1_700_000_000, 0)
	ss.seen("s1", "vm", "vol", time.Minute, t0)
	ss.lock("s1", t0)
	for _, tc := range []struct {
		at     time.Duration
		locked bool
	}{{time.Hour, true}, {forgetAfter, true}, {forgetAfter + time.Minute, false}} {
		ss.flagStale(t0.Add(tc.at))
		if got := ss.isLocked("s1"); got != tc.locked {
			t.Fatalf("%s after the lock: locked %v, want %v", tc.at, got, tc.locked)
		}
	}
	if n := ss.staleCount(); n != 0 {
		t.Fatalf("a locked session is counted stale (%d)", n)
	}
}
