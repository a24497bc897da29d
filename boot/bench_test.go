package boot

import (
	"context"
	"net"
	"slices"
	"testing"
	"time"

	"github.com/google/go-tpm/legacy/tpm2"
	"github.com/hugelgupf/p9/p9"

	"github.com/keygate/keygate/internal/testutil"
	"github.com/keygate/keygate/tpm"
)

// BenchmarkBoot measures the unlock latency as a user sees it: from the
// start of a boot (TPM open, EK/AK, challenge, quote, unlock, Import,
// keyslot, filesystem, PCR 15 extend) until the 9P socket answers a
// version handshake, on swtpm with keysvc on loopback. Each iteration is a
// fresh "reboot" of the same swtpm (its state kept, so the EK and the
// enrollment stay valid, and PCR 15 starts at zero again); the restart is
// not timed. It reports p50 and p95 in ms.
func BenchmarkBoot(b *testing.B) { benchBoot(b, "") }

// BenchmarkBootDeadReplica is BenchmarkBoot with a replica first in
// --keysvc that accepts connections and never answers the TLS handshake
// (the worst kind of dead: a refused connection fails at once). Its p50
// less BenchmarkBoot's is the time a VM loses to a dead replica at the
// head of its list (target under 1 s; scripts/bench.sh prints it).
func BenchmarkBootDeadReplica(b *testing.B) { benchBoot(b, testutil.BlackHole(b)) }

// benchBoot runs the boots of BenchmarkBoot, with first (if set) listed
// before the key service.
func benchBoot(b *testing.B, first string) {
	state := b.TempDir()
	sock, stop := testutil.StartSwtpm(b, state)
	e := startEnv(b)
	tp, err := tpm.Open("swtpm:" + sock)
	if err != nil {
		b.Fatal(err)
	}
	e.enroll(b, tp, "bench", false)
	tp.Close()
	img := e.volume(b, "bench", "bench-vol")
	p9sock := socketPath(b)
	urls := e.url()
	if first != "" {
		urls = first + "," + urls
	}

	var lat []time.Duration
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		b.StopTimer()
		orderlyShutdown(b, sock)
		stop()
		sock, stop = testutil.StartSwtpm(b, state)
		b.StartTimer()
		start := time.Now()
		bt, err := Run(context.Background(), Config{KeysvcURL: urls, CA: e.ca, VM: "bench", Image: img, TPMSpec: "swtpm:" + sock,
			Serve9P: p9sock, Log: quietLog()})
		if err != nil {
			b.Fatalf("boot %d: %v", i, err)
		}
		conn, err := net.Dial("unix", p9sock)
		if err != nil {
			b.Fatal(err)
		}
		c, err := p9.NewClient(conn)
		if err != nil {
			b.Fatalf("9P handshake: %v", err)
		}
		lat = append(lat, time.Since(start))
		b.StopTimer()
		c.Close()
		bt.Close()
		b.StartTimer()
	}
	b.StopTimer()
	orderlyShutdown(b, sock)
	stop()
	slices.Sort(lat)
	pct := func(p float64) float64 {
		return float64(lat[min(len(lat)-1, int(p*float64(len(lat))))].Microseconds()) / 1000
	}
	b.ReportMetric(pct(0.50), "p50-ms")
	b.ReportMetric(pct(0.95), "p95-ms")
}

// orderlyShutdown sends TPM2_Shutdown(CLEAR), as an OS does before a
// reboot. Without it every swtpm restart counts as a dirty shutdown, and a
// few of those put the TPM into dictionary-attack lockout.
func orderlyShutdown(b *testing.B, sock string) {
	conn, err := net.Dial("unix", sock)
	if err != nil {
		b.Fatal(err)
	}
	defer conn.Close()
	if err := tpm2.Shutdown(conn, tpm2.StartupClear); err != nil {
		b.Fatalf("TPM2_Shutdown: %v", err)
	}
}
