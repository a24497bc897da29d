package attest_test

import (
	"bytes"
	"crypto"
	"encoding/hex"
	"encoding/json"
	"errors"
	"strings"
	"testing"

	"github.com/google/go-tpm-tools/client"
	pb "github.com/google/go-tpm-tools/proto/attest"
	tpmpb "github.com/google/go-tpm-tools/proto/tpm"
	"github.com/google/go-tpm/legacy/tpm2"
	"google.golang.org/protobuf/proto"

	"github.com/keygate/keygate/attest"
)

// sha256Quote returns the attestation's SHA-256 quote.
func sha256Quote(t testing.TB, att *pb.Attestation) *tpmpb.Quote {
	t.Helper()
	for _, q := range att.GetQuotes() {
		if q.GetPcrs().GetHash() == tpmpb.HashAlgo_SHA256 {
			return q
		}
	}
	t.Fatal("attestation has no SHA-256 quote")
	return nil
}

func TestVerifySimulator(t *testing.T) {
	v := newVM(t)
	v.extend(t, 4, "kernel-a")
	v.extend(t, 9, "initrd-a")
	nonce := []byte("nonce-0123456789abcdef0123456789")
	good := v.attest(t, nonce)
	other := v.attest(t, []byte("another nonce"))
	pcr0, pcr4, pcr9 := v.pcr(t, 0), v.pcr(t, 4), v.pcr(t, 9)
	bogus := bytes.Repeat([]byte{0xee}, 32)
	bogus2 := bytes.Repeat([]byte{0xdd}, 32)

	// A quote over PCRs 0-7 only, as a VM that quotes too little would send.
	partialQuote, err := v.ak.Quote(tpm2.PCRSelection{Hash: tpm2.AlgSHA256, PCRs: []int{0, 1, 2, 3, 4, 5, 6, 7}}, nonce)
	if err != nil {
		t.Fatal(err)
	}
	partial := &pb.Attestation{AkPub: good.GetAkPub(), Quotes: []*tpmpb.Quote{partialQuote}}

	policy := mustPolicy(t, map[int][][]byte{0: {pcr0}, 4: {pcr4}, 9: {pcr9}})
	trusted := []crypto.PublicKey{v.akPub()}
	opts := attest.VerifyOpts{Nonce: nonce, TrustedAKs: trusted, Policy: policy}

	tests := []struct {
		name   string
		att    func() *pb.Attestation
		opts   func(o *attest.VerifyOpts)
		want   error
		denial func(t *testing.T, d *attest.Denial)
	}{
		{name: "happy path"},
		{name: "wrong nonce", opts: func(o *attest.VerifyOpts) { o.Nonce = []byte("another nonce") }, want: attest.ErrEvidence},
		{name: "flipped signature byte", att: func() *pb.Attestation {
			a := proto.Clone(good).(*pb.Attestation)
			q := sha256Quote(t, a)
			q.RawSig[len(q.RawSig)-1] ^= 1
			return a
		}, want: attest.ErrEvidence},
		{name: "swapped quote from another nonce", att: func() *pb.Attestation {
			a := proto.Clone(good).(*pb.Attestation)
			for i, q := range a.Quotes {
				if q.GetPcrs().GetHash() == tpmpb.HashAlgo_SHA256 {
					a.Quotes[i] = proto.Clone(sha256Quote(t, other)).(*tpmpb.Quote)
				}
			}
			return a
		}, want: attest.ErrEvidence},
		{name: "altered PCR value beside a genuine quote", att: func() *pb.Attestation {
			a := proto.Clone(good).(*pb.Attestation)
			sha256Quote(t, a).Pcrs.Pcrs[4] = bogus
			return a
		}, want: attest.ErrEvidence},
		{name: "two SHA-256 quotes", att: func() *pb.Attestation {
			a := proto.Clone(good).(*pb.Attestation)
			a.Quotes = append(a.Quotes, proto.Clone(sha256Quote(t, other)).(*tpmpb.Quote))
			return a
		}, want: attest.ErrEvidence},
		{name: "no SHA-256 quote", att: func() *pb.Attestation {
			a := proto.Clone(good).(*pb.Attestation)
			a.Quotes = nil
			return a
		}, want: attest.ErrEvidence},
		{name: "nil attestation", att: func() *pb.Attestation { return nil }, want: attest.ErrEvidence},
		{name: "AK not enrolled", opts: func(o *attest.VerifyOpts) { o.TrustedAKs = []crypto.PublicKey{randomKey(t)} }, want: attest.ErrUntrustedAK},
		{name: "AK enrolled among others", opts: func(o *attest.VerifyOpts) { o.TrustedAKs = []crypto.PublicKey{randomKey(t), v.akPub()} }},
		{name: "PCR mismatch names PCR, allowed and got",
			opts: func(o *attest.VerifyOpts) {
				o.Policy = mustPolicy(t, map[int][][]byte{0: {pcr0}, 4: {bogus, bogus2}, 9: {pcr9}})
			},
			want: attest.ErrPolicyDenied,
			denial: func(t *testing.T, d *attest.Denial) {
				want := []attest.PCRMismatch{{PCR: 4, Allowed: []string{hex.EncodeToString(bogus), hex.EncodeToString(bogus2)}, Got: hex.EncodeToString(pcr4)}}
				if !equalJSON(t, d.Mismatches, want) || len(d.Rules) != 0 {
					t.Errorf("denial = %+v, want mismatches %+v", d, want)
				}
				if !strings.Contains(d.Error(), "PCR 4 is "+hex.EncodeToString(pcr4)) {
					t.Errorf("error %q does not name PCR 4 and its value", d.Error())
				}
			}},
		{name: "every mismatching PCR is named",
			opts: func(o *attest.VerifyOpts) {
				o.Policy = mustPolicy(t, map[int][][]byte{0: {bogus}, 4: {pcr4}, 9: {bogus}})
			},
			want: attest.ErrPolicyDenied,
			denial: func(t *testing.T, d *attest.Denial) {
				if len(d.Mismatches) != 2 || d.Mismatches[0].PCR != 0 || d.Mismatches[1].PCR != 9 {
					t.Errorf("mismatches = %+v, want PCRs 0 and 9", d.Mismatches)
				}
			}},
		{name: "policy PCR absent from the quote", att: func() *pb.Attestation { return partial },
			want: attest.ErrPolicyDenied,
			denial: func(t *testing.T, d *attest.Denial) {
				if len(d.Mismatches) != 1 || d.Mismatches[0].PCR != 9 || !d.Mismatches[0].Missing || d.Mismatches[0].Got != "" {
					t.Errorf("mismatches = %+v, want PCR 9 missing", d.Mismatches)
				}
			}},
		{name: "partial quote covering the policy passes", att: func() *pb.Attestation { return partial },
			opts: func(o *attest.VerifyOpts) { o.Policy = mustPolicy(t, map[int][][]byte{0: {pcr0}, 4: {pcr4}}) }},
		{name: "two allowed values, first matches",
			opts: func(o *attest.VerifyOpts) { o.Policy = mustPolicy(t, map[int][][]byte{4: {pcr4, bogus}}) }},
		{name: "two allowed values, second matches",
			opts: func(o *attest.VerifyOpts) { o.Policy = mustPolicy(t, map[int][][]byte{4: {bogus, pcr4}}) }},
		{name: "secure boot rule without event log",
			opts: func(o *attest.VerifyOpts) {
				p := *policy
				p.SecureBoot = boolp(true)
				o.Policy = &p
			},
			want: attest.ErrPolicyDenied,
			denial: func(t *testing.T, d *attest.Denial) {
				if len(d.Mismatches) != 0 || len(d.Rules) != 1 || d.Rules[0].Rule != attest.RuleSecureBoot ||
					!strings.Contains(d.Rules[0].Got, "no UEFI event log") {
					t.Errorf("denial = %+v, want one secure_boot failure for the missing log", d)
				}
			}},
		{name: "cmdline rule without event log",
			opts: func(o *attest.VerifyOpts) {
				p := *policy
				p.KernelCmdline = &attest.CmdlineRule{Contains: []string{"ro"}}
				o.Policy = &p
			},
			want: attest.ErrPolicyDenied,
			denial: func(t *testing.T, d *attest.Denial) {
				if len(d.Rules) != 1 || d.Rules[0].Rule != attest.RuleCmdlineContain {
					t.Errorf("rules = %+v, want one kernel_cmdline.contains failure", d.Rules)
				}
			}},
		{name: "empty policy denies", opts: func(o *attest.VerifyOpts) { o.Policy = &attest.Policy{} }, want: attest.ErrPolicyDenied},
		{name: "invalid policy", opts: func(o *attest.VerifyOpts) { o.Policy = &attest.Policy{PCRs: map[int][][]byte{30: {pcr0}}} }, want: errAny},
		{name: "no policy", opts: func(o *attest.VerifyOpts) { o.Policy = nil }, want: errAny},
		{name: "no nonce", opts: func(o *attest.VerifyOpts) { o.Nonce = nil }, want: errAny},
		{name: "no enrolled AK", opts: func(o *attest.VerifyOpts) { o.TrustedAKs = nil }, want: errAny},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			att := good
			if tc.att != nil {
				att = tc.att()
			}
			o := opts
			if tc.opts != nil {
				tc.opts(&o)
			}
			res, err := attest.Verify(att, o)
			checkErr(t, err, tc.want)
			if err == nil {
				if !bytes.Equal(res.PCRs[4], pcr4) || res.MachineState == nil || res.AK == nil {
					t.Errorf("result = %+v, want PCR 4 %x and a machine state", res, pcr4)
				}
				return
			}
			var d *attest.Denial
			if errors.As(err, &d) != errors.Is(err, attest.ErrPolicyDenied) {
				t.Fatalf("err %v: *Denial and ErrPolicyDenied disagree", err)
			}
			if errors.Is(err, attest.ErrPolicyDenied) && errors.Is(err, attest.ErrEvidence) {
				t.Fatalf("err %v is both a denial and bad evidence", err)
			}
			if tc.denial != nil {
				tc.denial(t, d)
			}
		})
	}
}

func TestLearn(t *testing.T) {
	v := newVM(t)
	v.extend(t, 7, "secure boot db")
	nonce := []byte("learn nonce")
	att := v.attest(t, nonce)
	opts := attest.VerifyOpts{Nonce: nonce, TrustedAKs: []crypto.PublicKey{v.akPub()}}

	t.Run("capture selected PCRs", func(t *testing.T) {
		p, res, err := attest.Learn(att, opts, []int{0, 7})
		if err != nil {
			t.Fatal(err)
		}
		if len(p.PCRs) != 2 || !bytes.Equal(p.PCRs[7][0], v.pcr(t, 7)) || !bytes.Equal(p.PCRs[0][0], res.PCRs[0]) {
			t.Fatalf("learned %v, want PCRs 0 and 7 as quoted", p.PCRs)
		}
		o := opts
		o.Policy = p
		if _, err := attest.Verify(att, o); err != nil {
			t.Fatalf("Verify against the learned policy: %v", err)
		}
	})
	t.Run("capture every quoted PCR", func(t *testing.T) {
		p, _, err := attest.Learn(att, opts, nil)
		if err != nil {
			t.Fatal(err)
		}
		if len(p.PCRs) != attest.NumPCRs {
			t.Fatalf("learned %d PCRs, want %d", len(p.PCRs), attest.NumPCRs)
		}
	})
	t.Run("ignores a stale PCR policy", func(t *testing.T) {
		o := opts
		o.Policy = mustPolicy(t, map[int][][]byte{7: {bytes.Repeat([]byte{1}, 32)}})
		if _, _, err := attest.Learn(att, o, []int{7}); err != nil {
			t.Fatalf("Learn with a mismatching PCR policy: %v", err)
		}
	})
	t.Run("keeps and enforces rules", func(t *testing.T) {
		o := opts
		o.Policy = &attest.Policy{SecureBoot: boolp(true)}
		_, _, err := attest.Learn(att, o, []int{7})
		checkErr(t, err, attest.ErrPolicyDenied)
	})
	t.Run("wrong nonce", func(t *testing.T) {
		o := opts
		o.Nonce = []byte("stale")
		_, _, err := attest.Learn(att, o, nil)
		checkErr(t, err, attest.ErrEvidence)
	})
	t.Run("untrusted AK", func(t *testing.T) {
		o := opts
		o.TrustedAKs = []crypto.PublicKey{randomKey(t)}
		_, _, err := attest.Learn(att, o, nil)
		checkErr(t, err, attest.ErrUntrustedAK)
	})
	t.Run("boot PCRs", func(t *testing.T) {
		p, _, err := attest.Learn(att, opts, attest.BootPCRs)
		if err != nil {
			t.Fatal(err)
		}
		if len(p.PCRs) != len(attest.BootPCRs) {
			t.Fatalf("learned %d PCRs, want %d", len(p.PCRs), len(attest.BootPCRs))
		}
	})
	t.Run("empty selection", func(t *testing.T) {
		_, _, err := attest.Learn(att, opts, []int{})
		checkErr(t, err, errAny)
	})
	t.Run("PCR not quoted", func(t *testing.T) {
		_, _, err := attest.Learn(att, opts, []int{24})
		checkErr(t, err, errAny)
	})
}

// TestVerifyRecordedEventLog uses a real GCE attestation (Container-Optimized
// OS 85, GRUB, Secure Boot on) whose UEFI event log replays to its quote.
func TestVerifyRecordedEventLog(t *testing.T) {
	att := recorded(t, "gce-cos-85-nonce9009.pb")
	nonce := []byte{0x90, 0x09}
	base := attest.VerifyOpts{Nonce: nonce, TrustedAKs: []crypto.PublicKey{recordedAK(t, att)}}
	learned, _, err := attest.Learn(att, base, []int{0, 2, 4, 7, 8, 9})
	if err != nil {
		t.Fatalf("Learn: %v", err)
	}
	const cmdline = "/syslinux/vmlinuz.A init=/usr/lib/systemd/systemd boot=local rootwait ro noresume noswap loglevel=7 noinitrd console=ttyS0 security=apparmor virtio_net.napi_tx=1 systemd.unified_cgroup_hierarchy=false systemd.legacy_systemd_cgroup_controller=false csm.disabled=1 loadpin.exclude=kernel-module modules-load=loadpin_trigger module.sig_enforce=1 dm_verity.error_behavior=3 dm_verity.max_bios=-1 dm_verity.dev_wait=1 i915.modeset=1 cros_efi root=/dev/dm-0 \"dm=1 vroot none ro 1,0 4077568 verity payload=PARTUUID=EF8ECEE2-2385-AE4F-A146-1ED93D8AC217 hashtree=PARTUUID=EF8ECEE2-2385-AE4F-A146-1ED93D8AC217 hashstart=4077568 alg=sha256 root_hexdigest=795872ee03859c10dfcc4d67b4b96c85094b340c2d8784783abc2fa12a6ed671 salt=40eb77fb9093cbff56a6f9c2214c4f7554817d079513b7c77de4953d6b8ffc16\""
	withRules := func(sb *bool, r *attest.CmdlineRule) *attest.Policy {
		p := *learned
		p.SecureBoot, p.KernelCmdline = sb, r
		return &p
	}
	tests := []struct {
		name   string
		policy *attest.Policy
		att    func() *pb.Attestation
		want   error
		rules  []string
		gotHas string // in the first failed rule's Got
	}{
		{name: "PCRs only", policy: learned},
		{name: "secure boot on", policy: withRules(boolp(true), nil)},
		{name: "secure boot off wanted", policy: withRules(boolp(false), nil), want: attest.ErrPolicyDenied, rules: []string{attest.RuleSecureBoot}},
		{name: "cmdline equals", policy: withRules(nil, &attest.CmdlineRule{Equals: cmdline})},
		{name: "cmdline contains", policy: withRules(nil, &attest.CmdlineRule{Contains: []string{"module.sig_enforce=1", "ro"}})},
		{name: "cmdline differs", policy: withRules(nil, &attest.CmdlineRule{Equals: cmdline + " debug"}),
			want: attest.ErrPolicyDenied, rules: []string{attest.RuleCmdlineEquals}},
		{name: "cmdline lacks word", policy: withRules(boolp(true), &attest.CmdlineRule{Contains: []string{"lockdown=integrity", "module.sig_enforce"}}),
			want: attest.ErrPolicyDenied, rules: []string{attest.RuleCmdlineContain}},
		{name: "rules and PCR fail together",
			policy: func() *attest.Policy {
				p := withRules(boolp(false), nil)
				p.PCRs = map[int][][]byte{8: {bytes.Repeat([]byte{3}, 32)}}
				return p
			}(),
			want: attest.ErrPolicyDenied, rules: []string{attest.RuleSecureBoot}},
		{name: "truncated event log", policy: learned, att: func() *pb.Attestation {
			a := proto.Clone(att).(*pb.Attestation)
			a.EventLog = a.EventLog[:len(a.EventLog)-10]
			return a
		}, want: attest.ErrEvidence},
		// Event data is not covered by the PCRs; only its digest is. A log
		// whose command-line text was edited still replays, so the rule
		// must check the text against the event digest.
		{name: "cmdline text edited in the log", policy: withRules(nil, &attest.CmdlineRule{Contains: []string{"rw"}}),
			att: func() *pb.Attestation {
				a := proto.Clone(att).(*pb.Attestation)
				i := bytes.Index(a.EventLog, []byte("kernel_cmdline: /syslinux"))
				j := bytes.Index(a.EventLog[i:], []byte(" ro "))
				if i < 0 || j < 0 {
					t.Fatal("kernel_cmdline event not found in the recorded log")
				}
				a.EventLog[i+j+1] = 'r'
				a.EventLog[i+j+2] = 'w'
				return a
			}, want: attest.ErrPolicyDenied, rules: []string{attest.RuleCmdlineContain}, gotHas: "does not match its digest"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			a := att
			if tc.att != nil {
				a = tc.att()
			}
			o := base
			o.Policy = tc.policy
			_, err := attest.Verify(a, o)
			checkErr(t, err, tc.want)
			var d *attest.Denial
			if errors.As(err, &d) {
				var got []string
				for _, r := range d.Rules {
					got = append(got, r.Rule)
				}
				if strings.Join(got, ",") != strings.Join(tc.rules, ",") {
					t.Errorf("failed rules = %v, want %v (%v)", got, tc.rules, d)
				}
				if tc.gotHas != "" && !strings.Contains(d.Rules[0].Got, tc.gotHas) {
					t.Errorf("rule got %q, want it to contain %q", d.Rules[0].Got, tc.gotHas)
				}
			}
		})
	}
}

// TestVerifyEventLogParserPanic: event types are not covered by the PCRs,
// and go-eventlog panics on some it does not know. The recorded input (a
// fuzzer find: one event type byte changed) must be refused, not crash.
func TestVerifyEventLogParserPanic(t *testing.T) {
	att := recorded(t, "gce-cos-85-event-type-panic.pb")
	opts := attest.VerifyOpts{Nonce: []byte{0x90, 0x09}, TrustedAKs: []crypto.PublicKey{recordedAK(t, att)},
		Policy: mustPolicy(t, map[int][][]byte{0: {make([]byte, 32)}})}
	_, err := attest.Verify(att, opts)
	checkErr(t, err, attest.ErrEvidence)
	if !strings.Contains(err.Error(), "event log parser failed") {
		t.Errorf("err = %v, want the parser failure named", err)
	}
}

func TestDenialJSON(t *testing.T) {
	d := &attest.Denial{Reason: "r", Mismatches: []attest.PCRMismatch{{PCR: 7, Allowed: []string{"aa", "bb"}, Got: "cc"}}}
	b, err := json.Marshal(d)
	if err != nil {
		t.Fatal(err)
	}
	want := `{"reason":"r","mismatches":[{"pcr":7,"allowed":["aa","bb"],"got":"cc"}]}`
	if string(b) != want {
		t.Errorf("json = %s\nwant   %s", b, want)
	}
	b, _ = json.Marshal(&attest.Denial{Reason: "r", Rules: []attest.RuleFailure{{Rule: "secure_boot", Want: "enabled", Got: "disabled"}}})
	want = `{"reason":"r","mismatches":[],"rules":[{"rule":"secure_boot","want":"enabled","got":"disabled"}]}`
	if string(b) != want {
		t.Errorf("json = %s\nwant   %s", b, want)
	}
	if !errors.Is(d, attest.ErrPolicyDenied) {
		t.Error("Denial does not match ErrPolicyDenied")
	}
}

// errAny stands for "some error, no particular sentinel".
var errAny = errors.New("any error")

func checkErr(t *testing.T, err, want error) {
	t.Helper()
	switch {
	case want == nil && err != nil:
		t.Fatalf("unexpected error: %v", err)
	case want != nil && err == nil:
		t.Fatalf("no error, want %v", want)
	case want != nil && want != errAny && !errors.Is(err, want):
		t.Fatalf("err = %v, want %v", err, want)
	}
}

func equalJSON(t *testing.T, a, b any) bool {
	t.Helper()
	x, _ := json.Marshal(a)
	y, _ := json.Marshal(b)
	return bytes.Equal(x, y)
}

func TestCheckAKPublic(t *testing.T) {
	v := newVM(t)
	area, err := v.ak.PublicArea().Encode()
	if err != nil {
		t.Fatal(err)
	}
	unrestricted := v.ak.PublicArea()
	unrestricted.Attributes &^= tpm2.FlagRestricted
	unrestrictedArea, _ := unrestricted.Encode()
	decrypt := v.ak.PublicArea()
	decrypt.Attributes |= tpm2.FlagDecrypt
	decryptArea, _ := decrypt.Encode()
	tests := []struct {
		name    string
		area    []byte
		wantErr string
	}{
		{"simulator AK", area, ""},
		{"not restricted", unrestrictedArea, "restricted signing key"},
		{"also decrypts", decryptArea, "decryption key"},
		{"garbage", []byte{1, 2, 3}, "decode AK public area"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			key, err := attest.CheckAKPublic(tc.area)
			if tc.wantErr == "" {
				if err != nil {
					t.Fatal(err)
				}
				a, _ := attest.KeyFingerprint(key)
				b, _ := attest.KeyFingerprint(v.akPub())
				if a != b {
					t.Fatal("returned key is not the AK")
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("err = %v, want one containing %q", err, tc.wantErr)
			}
		})
	}
}

// TestVerifyRSAAK: an RSA AK (tpm.RSA) verifies the same way.
func TestVerifyRSAAK(t *testing.T) {
	v := newVM(t)
	ak, err := client.AttestationKeyRSA(v.sim)
	if err != nil {
		t.Fatal(err)
	}
	defer ak.Close()
	nonce := []byte("rsa nonce")
	att, err := ak.Attest(client.AttestOpts{Nonce: nonce, TCGEventLog: []byte{}})
	if err != nil {
		t.Fatal(err)
	}
	opts := attest.VerifyOpts{Nonce: nonce, TrustedAKs: []crypto.PublicKey{ak.PublicKey()},
		Policy: mustPolicy(t, map[int][][]byte{0: {v.pcr(t, 0)}})}
	if _, err := attest.Verify(att, opts); err != nil {
		t.Fatalf("Verify: %v", err)
	}
	opts.TrustedAKs = []crypto.PublicKey{v.akPub()} // the ECC AK of the same TPM
	_, err = attest.Verify(att, opts)
	checkErr(t, err, attest.ErrUntrustedAK)
}
