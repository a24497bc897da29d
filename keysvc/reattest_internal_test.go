package keysvc

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	pb "github.com/google/go-tpm-tools/proto/attest"
	"github.com/google/go-tpm/legacy/tpm2"
	"google.golang.org/protobuf/proto"

	"github.com/keygate/keygate/attest"
	"github.com/keygate/keygate/keysvc/audit"
	"github.com/keygate/keygate/keysvc/masterkey"
	"github.com/keygate/keygate/keysvc/store"
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
// forgetAfter has passed, then CheckStale forgets it, in the store and in
// the replica's cache (as docs/protocol.md says: for 24 hours); and a
// locked session is never counted stale.
func TestLockedSessionsForgotten(t *testing.T) {
	dir := t.TempDir()
	ctx := t.Context()
	mk, _, err := masterkey.LoadOrCreate(filepath.Join(dir, "master.key"))
	if err != nil {
		t.Fatal(err)
	}
	st, err := store.OpenSQLite(ctx, dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	lg, err := audit.New(st, mk)
	if err != nil {
		t.Fatal(err)
	}
	t0 := time.Unix(1_700_000_000, 0)
	now := t0
	s, err := New(WithStore(st), WithAudit(lg), WithMasterKey(mk), WithAdminToken(strings.Repeat("a", MinAdminTokenLen)), WithCA([32]byte{1}),
		WithClock(func() time.Time { return now }))
	if err != nil {
		t.Fatal(err)
	}
	c := sessionClaims{VM: "vm", Volume: "vol", ID: "s1"}
	if _, _, err := s.seen(ctx, c, time.Minute); err != nil {
		t.Fatal(err)
	}
	s.lock(ctx, c)
	for _, tc := range []struct {
		at     time.Duration
		locked bool
	}{{time.Hour, true}, {forgetAfter, true}, {forgetAfter + time.Minute, false}} {
		now = t0.Add(tc.at)
		if n := s.CheckStale(ctx); n != 0 {
			t.Fatalf("%s after the lock: a locked session was flagged stale", tc.at)
		}
		if got, err := s.isLocked(ctx, c); err != nil || got != tc.locked {
			t.Fatalf("%s after the lock: locked %v (%v), want %v", tc.at, got, err, tc.locked)
		}
		if got := s.countStale(); got != 0 {
			t.Fatalf("a locked session is counted stale (%v)", got)
		}
	}
	if _, err := st.GetReattestSession(ctx, c.ID); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("forgotten session still stored: %v", err)
	}
}
