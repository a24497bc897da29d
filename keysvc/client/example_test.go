package client_test

import (
	"context"
	"errors"
	"fmt"
	"log"
	"os"

	"github.com/keygate/keygate/keysvc/api"
	"github.com/keygate/keygate/keysvc/client"
)

// A VM's first call, to two replicas of one service: a dead first replica
// costs the connect timeout, a refusal from either is final.
func ExampleNew() {
	ca, err := os.ReadFile("ca.pem") // the service's DATA/ca.pem
	if err != nil {
		log.Fatal(err)
	}
	c, err := client.New(client.Config{
		URLs: []string{"https://keysvc-a.example:8443", "https://keysvc-b.example:8443"},
		CA:   ca,
	})
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close()
	ch, err := c.Challenge(context.Background(), api.ChallengeRequest{VM: "web-1", Volume: "web-1-data", EKPub: "…", AKPub: "…"})
	var r *client.Refusal
	var ue *client.UnreachableError
	switch {
	case errors.As(err, &r):
		log.Fatalf("refused (%s): %v", r.Reason, err) // final: no other replica is asked
	case errors.As(err, &ue):
		log.Printf("no replica answered; retry in at least %s", ue.RetryAfter())
	case err != nil:
		log.Fatal(err)
	default:
		fmt.Printf("nonce from %s: %x\n", c.Current(), ch.Nonce)
	}
}
