package main

import (
	"bytes"
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	kc "github.com/keygate/keygate/keysvc/client"

	"google.golang.org/protobuf/proto"

	"github.com/keygate/keygate/internal/testutil"
	"github.com/keygate/keygate/keysvc"
	"github.com/keygate/keygate/keysvc/api"
	"github.com/keygate/keygate/tpm"
)

// TestEventsCommand has a VM (the TPM simulator) unlock over HTTPS and
// post monitor events, then lists them with `keysvc events`.
func TestEventsCommand(t *testing.T) {
	data := t.TempDir()
	svc, err := keysvc.Start(context.Background(), keysvc.Config{DataDir: data, Listen: "127.0.0.1:0", AdminListen: "127.0.0.1:0",
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { svc.Shutdown(context.Background()) })
	t.Setenv("KEYSVC_SERVER", "https://"+svc.AdminAddr())
	t.Setenv("KEYSVC_CA", filepath.Join(data, keysvc.CAFile))
	t.Setenv("KEYSVC_TOKEN_FILE", filepath.Join(data, keysvc.AdminTokenFile))
	keysvcCmd := func(args ...string) (int, string, string) {
		var out, errb bytes.Buffer
		code := run(args, strings.NewReader(""), &out, &errb)
		return code, out.String(), errb.String()
	}

	if code, out, errs := keysvcCmd("events"); code != 0 || !strings.Contains(out, "no events") {
		t.Fatalf("events on an empty service: exit %d, %q %q", code, out, errs)
	}

	tp, err := tpm.Open("sim")
	if errors.Is(err, tpm.ErrNotSupported) {
		testutil.Skip(t, "cgo", err.Error())
	}
	if err != nil {
		t.Fatal(err)
	}
	defer tp.Close()
	ek, err := tp.EK(tpm.ECC)
	if err != nil {
		t.Fatal(err)
	}
	ak, err := tp.AK(tpm.ECC)
	if err != nil {
		t.Fatal(err)
	}
	tmp := t.TempDir()
	ekPEM, _ := ek.PEM()
	akPEM, _ := ak.PEM()
	pcrs, err := tp.PCRs(7)
	if err != nil {
		t.Fatal(err)
	}
	pol := `{"pcrs":{"7":["` + hex.EncodeToString(pcrs.GetPcrs()[7]) + `"]}}`
	for name, b := range map[string][]byte{"ek.pem": ekPEM, "ak.pem": akPEM, "pol.json": []byte(pol)} {
		if err := os.WriteFile(filepath.Join(tmp, name), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	for _, args := range [][]string{
		{"vm", "enroll", "--name", "web-1", "--ek-pub", filepath.Join(tmp, "ek.pem"), "--ak-pub", filepath.Join(tmp, "ak.pem")},
		{"volume", "create", "--id", "web-1-data", "--vm", "web-1"},
		{"policy", "set", "--vm", "web-1", "--file", filepath.Join(tmp, "pol.json")},
	} {
		if code, out, errs := keysvcCmd(args...); code != 0 {
			t.Fatalf("keysvc %v: exit %d, %q %q", args, code, out, errs)
		}
	}

	// The VM's side, over the VM API.
	caPEM, _ := os.ReadFile(filepath.Join(data, keysvc.CAFile))
	vmc, err := kc.New(kc.Config{URLs: []string{"https://" + svc.VMAddr()}, CA: caPEM})
	if err != nil {
		t.Fatal(err)
	}
	defer vmc.Close()
	vmCall := func(path string, req, resp any) {
		t.Helper()
		if err := vmc.Do(context.Background(), "POST", path, "", req, resp); err != nil {
			t.Fatalf("%s: %v", path, err)
		}
	}
	var ch api.ChallengeResponse
	vmCall("/v1/challenge", api.ChallengeRequest{VM: "web-1", Volume: "web-1-data", EKPub: string(ekPEM), AKPub: string(akPEM)}, &ch)
	att, err := tp.Attest(api.QuoteData(ch.Nonce, vmc.CASHA256()), tpm.ECC)
	if err != nil {
		t.Fatal(err)
	}
	raw, _ := proto.Marshal(att)
	var ur api.UnlockResponse
	vmCall("/v1/unlock", api.UnlockRequest{Challenge: ch.Challenge, Attestation: raw}, &ur)
	uid, res := uint32(0), int64(-1)
	var er api.EventsResponse
	vmCall("/v1/events", api.EventsRequest{Session: ur.Session, Events: []api.Event{
		{Kind: "heartbeat", Severity: "info"},
		{Kind: "process_vm_readv", Severity: "critical", PID: 4242, Comm: "evil", Exe: "/tmp/evil", UID: &uid,
			TargetPID: 17, Addr: 0x7f00dead0000, Len: 64, Overlap: true, OverlapBytes: 64, Result: &res, Denied: true, Mode: "deny"},
	}}, &er)
	if er.Accepted != 2 || er.State != api.StateActive {
		t.Fatalf("events answer %+v", er)
	}

	for _, tc := range []struct {
		args []string
		code int
		want []string // in stdout, or stderr when code != 0
		not  []string
	}{
		{[]string{"events"}, 0, []string{"heartbeat", "process_vm_readv", "by pid 4242 (evil) /tmp/evil uid 0", "on pid 17", "key pages", "result -1", "denied", "mode deny"}, nil},
		{[]string{"events", "--vm", "web-1", "--severity", "critical"}, 0, []string{"process_vm_readv"}, []string{"heartbeat"}},
		{[]string{"events", "--vm", "web-2"}, 0, []string{"no events"}, nil},
		{[]string{"events", "--kind", "heartbeat", "--since", "1h"}, 0, []string{"heartbeat"}, []string{"process_vm_readv"}},
		{[]string{"events", "--json", "--limit", "1"}, 0, []string{`"kind": "process_vm_readv"`, `"target_pid": 17`, `"uid": 0`, `"vm": "web-1"`}, []string{"heartbeat"}},
		{[]string{"events", "--severity", "loud"}, 1, []string{"severity", "400"}, nil},
		{[]string{"events", "--since", "yesterday"}, 1, []string{"RFC 3339"}, nil},
		{[]string{"events", "--limit", "0"}, 1, []string{"limit"}, nil},
	} {
		t.Run(strings.Join(tc.args, " "), func(t *testing.T) {
			code, out, errs := keysvcCmd(tc.args...)
			got := out
			if tc.code != 0 {
				got = errs
			}
			if code != tc.code {
				t.Fatalf("exit %d, want %d; stdout %q stderr %q", code, tc.code, out, errs)
			}
			for _, w := range tc.want {
				if !strings.Contains(got, w) {
					t.Errorf("output lacks %q:\n%s", w, got)
				}
			}
			for _, w := range tc.not {
				if strings.Contains(got, w) {
					t.Errorf("output has %q:\n%s", w, got)
				}
			}
		})
	}
	var recs []api.EventRecord
	_, out, _ := keysvcCmd("events", "--json")
	if err := json.Unmarshal([]byte(out), &recs); err != nil || len(recs) != 2 || recs[0].ID <= recs[1].ID {
		t.Fatalf("events --json: %v %s", err, out)
	}
	if h, err := tp.TransientHandles(); err != nil || len(h) != 0 {
		t.Errorf("transient handles left: %v %v", h, err)
	}
}
