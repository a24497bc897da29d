package testvm_test

import (
	"context"
	"errors"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/keygate/keygate/testvm"
)

func TestParseResult(t *testing.T) {
	tests := []struct {
		name, line, key, value string
		ok                     bool
	}{
		{"plain", "KEYGATE-RESULT lsm=lockdown,capability,yama,bpf", "lsm", "lockdown,capability,yama,bpf", true},
		{"empty value", "KEYGATE-RESULT modules_failed=", "modules_failed", "", true},
		{"value with equals", "KEYGATE-RESULT cmdline=console=ttyS0 lsm=bpf", "cmdline", "console=ttyS0 lsm=bpf", true},
		{"carriage return", "KEYGATE-RESULT done=0\r", "done", "0", true},
		{"after firmware escapes", "\x1b[2J\x1b[01;01HKEYGATE-RESULT net=pong", "net", "pong", true},
		{"no marker", "[    2.08] ima: Can not allocate sha384", "", "", false},
		{"no equals", "KEYGATE-RESULT done", "", "", false},
		{"empty key", "KEYGATE-RESULT =1", "", "", false},
		{"key with space", "KEYGATE-RESULT a b=1", "", "", false},
		{"marker without space", "KEYGATE-RESULTdone=0", "", "", false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			k, v, ok := testvm.ParseResult(tc.line)
			if ok != tc.ok || k != tc.key || v != tc.value {
				t.Errorf("ParseResult(%q) = %q, %q, %v; want %q, %q, %v", tc.line, k, v, ok, tc.key, tc.value, tc.ok)
			}
		})
	}
}

func FuzzParseResult(f *testing.F) {
	f.Add("KEYGATE-RESULT done=0")
	f.Add("junk KEYGATE-RESULT a=b=c\r")
	f.Fuzz(func(t *testing.T, line string) {
		k, v, ok := testvm.ParseResult(line)
		if !ok {
			return
		}
		if k == "" || strings.ContainsAny(k, " =\r\n") {
			t.Fatalf("bad key %q", k)
		}
		if !strings.Contains(line, testvm.ResultMarker+k+"="+v) {
			t.Fatalf("key %q value %q not in the line %q", k, v, line)
		}
	})
}

func TestConsole(t *testing.T) {
	tests := []struct {
		name    string
		input   string
		key     string
		want    string
		wantErr error
	}{
		{"reported", "OVMF noise\nKEYGATE-RESULT a=1\nKEYGATE-RESULT done=0\n", "done", "0", nil},
		{"last value wins", "KEYGATE-RESULT a=1\nKEYGATE-RESULT a=2\n", "a", "2", nil},
		{"unterminated last line", "KEYGATE-RESULT a=1", "a", "1", nil},
		{"guest ended first", "KEYGATE-RESULT a=1\n[ 4.3] reboot: Power down\n", "done", "", testvm.ErrConsoleClosed},
		{"empty console", "", "done", "", testvm.ErrConsoleClosed},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c := testvm.NewConsole(strings.NewReader(tc.input), nil)
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			got, err := c.Result(ctx, tc.key)
			if !errors.Is(err, tc.wantErr) || got != tc.want {
				t.Fatalf("Result(%q) = %q, %v; want %q, %v", tc.key, got, err, tc.want, tc.wantErr)
			}
			<-c.Done()
			if tc.wantErr != nil && !strings.Contains(err.Error(), "guest console") {
				t.Errorf("error %q does not carry the console's tail", err)
			}
			if c.Text() != strings.TrimSuffix(tc.input, "\n") {
				t.Errorf("Text() = %q, want the input", c.Text())
			}
		})
	}
}

func TestConsoleTimeout(t *testing.T) {
	r, w := io.Pipe()
	defer w.Close()
	c := testvm.NewConsole(r, nil)
	if _, err := io.WriteString(w, "KEYGATE-RESULT userspace_uptime=2.7\n"); err != nil {
		t.Fatal(err)
	}
	if got, err := c.Result(context.Background(), "userspace_uptime"); err != nil || got != "2.7" {
		t.Fatalf("Result = %q, %v", got, err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := c.Result(ctx, "done"); !errors.Is(err, context.Canceled) {
		t.Fatalf("Result on a silent guest = %v, want context.Canceled", err)
	}
	if _, ok := c.At("userspace_uptime"); !ok {
		t.Errorf("At(userspace_uptime) unknown")
	}
}
