package keysvc_test

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/keygate/keygate/keysvc"
)

// childEnv names the data directory and database ("DIR URL") of a replica
// the test binary runs as, in a process of its own, so that a test can
// SIGKILL it.
const childEnv = "KEYGATE_TEST_KEYSVC_REPLICA"

// runChild serves a replica until the process is killed, after printing
// its VM API's address.
func runChild(spec string) int {
	dir, url, _ := strings.Cut(spec, " ")
	svc, err := keysvc.Start(context.Background(), keysvc.Config{DataDir: dir, DB: url, Listen: "127.0.0.1:0", AdminListen: "127.0.0.1:0",
		Logger: discardLogger(), Options: []keysvc.Option{keysvc.WithChallengeTTL(time.Minute)}})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	fmt.Printf("vm %s\n", svc.VMAddr())
	select {}
}

// child is a replica in another process.
type child struct {
	cmd    *exec.Cmd
	addr   string
	client *http.Client
}

// startChild runs a replica over dir and url in a child process, reached
// with e's client (the same CA); it is killed in t's cleanup.
func startChild(t *testing.T, e *env, dir, url string) *child {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), childEnv+"="+dir+" "+url)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	line, err := bufio.NewReader(out).ReadString('\n')
	addr, ok := strings.CutPrefix(strings.TrimSpace(line), "vm ")
	if err != nil || !ok {
		t.Fatalf("replica process: %q %v; stderr %s", line, err, stderr.String())
	}
	go io.Copy(io.Discard, out)
	return &child{cmd: cmd, addr: addr, client: e.client}
}

func (c *child) post(path string, body any) (int, []byte, error) {
	resp, err := c.client.Post("https://"+c.addr+path, "application/json", bytes.NewReader(mustJSONNoT(body)))
	if err != nil {
		return 0, nil, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, b, err
}
