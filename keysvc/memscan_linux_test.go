package keysvc_test

import (
	"errors"
	"net/http"
	"runtime"
	"testing"

	"github.com/keygate/keygate/internal/memscan"
	"github.com/keygate/keygate/internal/testutil"
	"github.com/keygate/keygate/keymem"
	"github.com/keygate/keygate/keysvc"
	"github.com/keygate/keygate/keysvc/api"
)

// TestReleaseLeavesNoUKInMemory imports a volume's UK through the admin API
// and releases it many times, then searches every readable mapping of the
// process (which runs the key service) for the UK: the import body, the
// unsealed copy and the import blob's construction must leave it nowhere
// outside locked memory, and the locked buffers that held it are wiped.
// The VM side only quotes here (the simulator runs in this process and
// would keep an imported key in its own memory).
func TestReleaseLeavesNoUKInMemory(t *testing.T) {
	e := startEnv(t, t.TempDir(), keysvc.WithRateLimits(0, 0))
	v := openVM(t)
	const name = "scanned"
	e.admin(t, "POST", "/v1/admin/vms", api.EnrollRequest{Name: name, EKPub: v.ekPEM, AKPub: v.akPEM}, http.StatusCreated)
	uk, err := keymem.Random(32) // only this test's: no other copy exists
	if err != nil {
		t.Fatal(err)
	}
	// encoding/json writes the key as base64 straight from the locked
	// buffer, so the test itself makes no plain copy.
	e.admin(t, "POST", "/v1/admin/volumes", api.VolumeRequest{ID: name + "-vol", VM: name, Key: uk.Bytes()}, http.StatusCreated)
	e.admin(t, "PUT", "/v1/admin/vms/"+name+"/policy", v.pcrPolicy(t, 0, 7), http.StatusOK)
	needle := memscan.NewNeedle("UK", uk.Bytes())
	uk.Destroy()

	for range 50 {
		if code, body := e.unlock(t, v, name, name+"-vol"); code != http.StatusOK {
			t.Fatalf("unlock: %d %s", code, body)
		}
	}
	runtime.GC()
	res, err := memscan.Scan([]memscan.Needle{needle})
	if errors.Is(err, memscan.ErrUnavailable) {
		testutil.Skip(t, "procmem", err.Error())
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("scanned %d MiB in %d mappings after 50 releases", res.Scanned>>20, res.Mappings)
	for _, h := range res.Hits {
		t.Errorf("UK found in the key service's memory: %v", h)
	}
}
