//go:build cgo

package tpm

import (
	"crypto"
	"crypto/ecdsa"
	"io"
	"net"
	"testing"
	"time"

	"github.com/google/go-tpm-tools/client"
	"github.com/google/go-tpm-tools/server"
	"github.com/google/go-tpm/legacy/tpm2"
	"github.com/google/go-tpm/tpmutil"
)

// TestTransientHandlesSeesLeaks proves the leak check used by every other
// test can fail: a key loaded and not flushed shows up.
func TestTransientHandlesSeesLeaks(t *testing.T) {
	tp, err := Open("sim")
	if err != nil {
		t.Fatal(err)
	}
	defer tp.Close()
	tp.mu.Lock()
	k, err := tp.loadAK(ECC)
	tp.mu.Unlock()
	if err != nil {
		t.Fatal(err)
	}
	hs, err := tp.TransientHandles()
	if err != nil {
		t.Fatal(err)
	}
	if len(hs) != 1 {
		t.Errorf("with one AK loaded, TransientHandles = %#x, want one handle", hs)
	}
	tp.mu.Lock()
	k.Close()
	tp.mu.Unlock()
	if hs, err = tp.TransientHandles(); err != nil || len(hs) != 0 {
		t.Errorf("after flushing the AK, TransientHandles = %#x, %v; want none", hs, err)
	}
}

// TestKeysLeaveNVAlone: EK and AK are created as transient primaries and
// flushed, never persisted (client.EndorsementKeyECC would persist them).
func TestKeysLeaveNVAlone(t *testing.T) {
	tp, err := Open("sim")
	if err != nil {
		t.Fatal(err)
	}
	defer tp.Close()
	for _, alg := range []Alg{ECC, RSA} {
		if _, err := tp.EK(alg); err != nil {
			t.Fatal(err)
		}
		if _, err := tp.AK(alg); err != nil {
			t.Fatal(err)
		}
	}
	tp.mu.Lock()
	defer tp.mu.Unlock()
	hs, err := client.Handles(tp.rw, tpm2.HandleTypePersistent)
	if err != nil {
		t.Fatal(err)
	}
	if len(hs) != 0 {
		t.Errorf("persistent handles after EK/AK: %#x, want none", hs)
	}
}

// TestGCEAK: where the vTPM holds GCE's AK template in NV, AK and Attest use
// the GCE AK (endorsement hierarchy) instead of the TCG default one.
func TestGCEAK(t *testing.T) {
	tp, err := Open("sim")
	if err != nil {
		t.Fatal(err)
	}
	defer tp.Close()
	tcg, err := tp.AK(ECC)
	if err != nil {
		t.Fatal(err)
	}

	template := client.AKTemplateECC()
	data, err := template.Encode()
	if err != nil {
		t.Fatal(err)
	}
	idx := tpmutil.Handle(client.GceAKTemplateNVIndexECC)
	if err := tpm2.NVDefineSpace(tp.rw, tpm2.HandleOwner, idx, "", "", nil,
		tpm2.AttrOwnerWrite|tpm2.AttrOwnerRead|tpm2.AttrNoDA, uint16(len(data))); err != nil {
		t.Fatal(err)
	}
	defer tpm2.NVUndefineSpace(tp.rw, "", tpm2.HandleOwner, idx)
	if err := tpm2.NVWrite(tp.rw, tpm2.HandleOwner, idx, "", data, 0); err != nil {
		t.Fatal(err)
	}

	gce, err := tp.AK(ECC)
	if err != nil {
		t.Fatal(err)
	}
	tp.mu.Lock()
	want, err := client.NewKey(tp.rw, tpm2.HandleEndorsement, template)
	tp.mu.Unlock()
	if err != nil {
		t.Fatal(err)
	}
	defer func() { tp.mu.Lock(); want.Close(); tp.mu.Unlock() }()
	if !want.PublicKey().(*ecdsa.PublicKey).Equal(gce.Key) {
		t.Error("AK with a GCE template in NV is not the endorsement-hierarchy key from that template")
	}
	if tcg.Key.(*ecdsa.PublicKey).Equal(gce.Key) {
		t.Error("AK ignored the GCE template in NV")
	}
	att, err := tp.Attest([]byte("nonce"), ECC)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := server.VerifyAttestation(att, server.VerifyOpts{Nonce: []byte("nonce"), TrustedAKs: []crypto.PublicKey{gce.Key}}); err != nil {
		t.Errorf("attestation not signed by the GCE AK: %v", err)
	}
}

// FuzzSockConn: a swtpm peer's bytes are outside input; framing them must
// never panic, hang past the deadline, or return more than the peer sent.
func FuzzSockConn(f *testing.F) {
	f.Add([]byte{0x80, 0x01, 0, 0, 0, 0x0a, 0, 0, 0, 0})
	f.Add([]byte{0x80, 0x01, 0, 0, 0, 0x0c, 0, 0, 0, 0, 1})
	f.Add([]byte{0x80, 0x01, 0xff, 0xff, 0xff, 0xff})
	f.Add([]byte("HTTP/1.1 400"))
	f.Fuzz(func(t *testing.T, peer []byte) {
		a, b := net.Pipe()
		defer a.Close()
		go func() {
			io.Copy(io.Discard, io.LimitReader(b, 4))
			b.Write(peer)
			b.Close()
		}()
		s := &sockConn{conn: a, timeout: time.Second}
		if _, err := s.Write([]byte{1, 2, 3, 4}); err != nil {
			return
		}
		got := 0
		buf := make([]byte, 7)
		for got <= len(peer) {
			n, err := s.Read(buf)
			got += n
			if err != nil || len(s.pending) == 0 {
				break
			}
		}
		if got > len(peer) {
			t.Fatalf("read %d bytes from a peer that sent %d", got, len(peer))
		}
	})
}
