package boot

import (
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// TestVMSideDeps: the VM side reaches the key service through keysvc/api
// and keysvc/client alone, never the server with its store, SQLite driver
// and metrics. (boot itself has Prometheus through ebpfmon's monitor
// metrics; the client must not.)
func TestVMSideDeps(t *testing.T) {
	server := []string{"github.com/keygate/keygate/keysvc", "github.com/keygate/keygate/keysvc/store",
		"github.com/keygate/keygate/keysvc/audit", "github.com/keygate/keygate/keysvc/masterkey", "modernc.org/sqlite"}
	for _, tc := range []struct {
		pkg       string
		forbidden []string
	}{
		{"github.com/keygate/keygate/boot", server},
		{"github.com/keygate/keygate/keysvc/client", append(server, "github.com/prometheus/client_golang/prometheus")},
		{"github.com/keygate/keygate/keysvc/api", append(server, "github.com/prometheus/client_golang/prometheus")},
	} {
		t.Run(filepath.Base(tc.pkg), func(t *testing.T) {
			out, err := exec.Command("go", "list", "-deps", tc.pkg).Output()
			if err != nil {
				t.Fatalf("go list -deps %s: %v", tc.pkg, err)
			}
			deps := map[string]bool{}
			for _, d := range strings.Fields(string(out)) {
				deps[d] = true
			}
			if !deps[tc.pkg] {
				t.Fatalf("go list -deps %s does not list the package itself: %q", tc.pkg, out)
			}
			for _, f := range tc.forbidden {
				for d := range deps {
					if d == f || strings.HasPrefix(d, f+"/") && f == "modernc.org/sqlite" {
						t.Errorf("%s depends on %s", tc.pkg, d)
					}
				}
			}
		})
	}
}
