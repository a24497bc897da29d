package main

import (
	"math/rand/v2"
	"net"
	"os"
	"strconv"
	"testing"
	"time"

	"github.com/rogpeppe/go-internal/testscript"
)

// TestMain lets the scripts under testdata/script run `keygate` as a real
// command: testscript re-executes this test binary as the keygate binary.
func TestMain(m *testing.M) {
	testscript.Main(m, map[string]func(){
		"keygate": func() { os.Exit(run(os.Args[1:], os.Stdin, os.Stdout, os.Stderr)) },
	})
}

// TestScripts runs the CLI contract scripts: each file is one user story,
// including its failure paths, run against the real binary.
func TestScripts(t *testing.T) {
	testscript.Run(t, testscript.Params{
		Dir:                 "testdata/script",
		RequireExplicitExec: true,
		Cmds: map[string]func(ts *testscript.TestScript, neg bool, args []string){
			"mkfile":   cmdMkfile,
			"waitsock": cmdWaitSock,
		},
	})
}

// cmdMkfile writes a file of pseudo-random bytes: mkfile NAME SIZE. Scripts
// need files bigger than they can reasonably embed.
func cmdMkfile(ts *testscript.TestScript, neg bool, args []string) {
	if neg || len(args) != 2 {
		ts.Fatalf("usage: mkfile NAME SIZE")
	}
	n, err := strconv.Atoi(args[1])
	ts.Check(err)
	b := make([]byte, n)
	r := rand.NewChaCha8([32]byte{1})
	r.Read(b)
	ts.Check(os.WriteFile(ts.MkAbs(args[0]), b, 0o644))
}

// cmdWaitSock waits until a unix socket accepts connections: waitsock PATH.
// The bound is for a hang, not a performance threshold.
func cmdWaitSock(ts *testscript.TestScript, neg bool, args []string) {
	if neg || len(args) != 1 {
		ts.Fatalf("usage: waitsock PATH")
	}
	for deadline := time.Now().Add(60 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		if c, err := net.Dial("unix", args[0]); err == nil {
			c.Close()
			return
		}
	}
	ts.Fatalf("nothing listens on %s after 60s", args[0])
}
