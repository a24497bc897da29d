package boot

import (
	"errors"
	"fmt"
	"time"

	"github.com/keygate/keygate/keysvc/client"
)

// The key service's answers, as keysvc/client decodes them. They are
// aliases so that callers of boot need not import the client.
type (
	// Refusal is a 403 answer of the key service (errors.Is ErrRefused).
	// Denial is set for a policy denial and carries the per-PCR
	// diagnostics the service sent.
	Refusal = client.Refusal
	// UnreachableError is a failure to get any answer from the key
	// service's replicas (connection refused, timeout, 5xx): the one kind
	// of failure Run retries.
	UnreachableError = client.UnreachableError
)

var (
	// ErrRefused matches every *Refusal: the key service answered, and
	// said no. Retrying does not help; the operator must act.
	ErrRefused = client.ErrRefused
	// ErrTLS matches a TLS failure that no retry can mend: the service's
	// certificate is not signed by the pinned CA (a wrong --ca, or a
	// machine in the middle).
	ErrTLS = client.ErrTLS
)

// CAFingerprint returns the lowercase hex SHA-256 of the first certificate
// (DER) in caPEM, as a keygate token stores it.
func CAFingerprint(caPEM []byte) (string, error) { return client.CAFingerprint(caPEM) }

// newClient returns the VM API client for urls (https base URLs, tried in
// order). With caPEM the server must chain to that CA, and when pin is also
// set the CA must have that fingerprint. With only pin, the server must
// present, in its chain, a CA certificate of that fingerprint that signs
// its leaf.
func newClient(urls []string, caPEM []byte, pin string, connect time.Duration) (*client.Client, error) {
	if caPEM == nil && pin == "" {
		return nil, errors.New("no CA to trust: pass --ca DATA/ca.pem (the volume has no keygate token to take the CA fingerprint from)")
	}
	cl, err := client.New(client.Config{URLs: urls, CA: caPEM, CAPin: pin, ConnectTimeout: connect})
	var pm *client.PinMismatchError
	if errors.As(err, &pm) {
		return nil, fmt.Errorf("the --ca certificate (sha256 %s) is not the CA the volume's keygate token pins (%s); pass the key service's own DATA/ca.pem", pm.Got, pm.Pin)
	}
	return cl, err
}
