package keysvc_test

import (
	"fmt"
	"net/http"
	"testing"

	"github.com/keygate/keygate/keysvc"
	"github.com/keygate/keygate/keysvc/api"
)

// BenchmarkMasterKeyRotation times one master-key rotation of a store of
// 100 VMs and 100 volumes, with the key in a file and in SoftHSM2, in the
// same run: report the ratio and rows per second, not the times. Each
// iteration rotates the same store again (a rotation of a rotated store
// does the same work).
func BenchmarkMasterKeyRotation(b *testing.B) {
	const n = 100
	for _, kind := range []string{"file", "softhsm2"} {
		b.Run(kind, func(b *testing.B) {
			dir := b.TempDir()
			cfg := keysvc.Config{DataDir: dir}
			if kind == "softhsm2" {
				cfg.PKCS11 = benchHSM(b)
			}
			e := startEnvConfig(b, cfg)
			for i := range n {
				name := fmt.Sprintf("bench-%d", i)
				e.admin(b, "POST", "/v1/admin/vms", api.EnrollRequest{Name: name, EKPub: randomPEM(b), AKPub: randomPEM(b)}, http.StatusCreated)
				e.admin(b, "POST", "/v1/admin/volumes", api.VolumeRequest{ID: name + "-vol", VM: name}, http.StatusCreated)
			}
			b.ResetTimer()
			for b.Loop() {
				e.admin(b, "POST", "/v1/admin/master-key/rotate", nil, http.StatusAccepted)
				if msg := e.waitRotation(b); msg != "" {
					b.Fatal(msg)
				}
			}
			b.ReportMetric(float64(2*n*b.N)/b.Elapsed().Seconds(), "rows/s")
		})
	}
}
