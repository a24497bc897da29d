package keysvc_test

import (
	"bytes"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"runtime/pprof"
	"runtime/trace"
	"slices"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/keygate/keygate/internal/pgtest"
	"github.com/keygate/keygate/keysvc"
	"github.com/keygate/keygate/keysvc/api"
)

// The load generator: two benchmarks drive the real HTTPS VM API (TLS 1.3,
// SQLite store, audit chain on) with POST /v1/unlock, one closed-loop and
// one open-loop.
//
// The VMs are played by one TPM simulator: every VM is enrolled with its EK
// and AK (the service allows one EK for several VMs), with its own volume
// and policy. The simulator quotes one request at a time and would be the
// bottleneck, so the quotes are precomputed: before the timer starts, b.N
// challenges are issued and quoted (the challenge TTL is raised to cover
// that). What is timed is the service's work per unlock: challenge redeem
// (a store write), quote verification, unsealing the UK, building the import blob,
// the audit append and the re-check after it, plus the load generator's own
// HTTPS client, which runs in the same process on the same two cores (the
// request bodies are encoded beforehand, so that the client costs what a
// VM's TLS and HTTP cost, not a JSON encoder's). Each client has its own
// connection, opened before the timer starts, so the TLS handshakes are not
// timed.
//
//	go test ./keysvc -run '^$' -bench '^BenchmarkUnlock$' -benchtime 2000x
//	go test ./keysvc -run '^$' -bench '^BenchmarkUnlockOpenLoop$' -benchtime 4500x -keysvc.rate 1500
//
// -keysvc.timedtrace writes an execution trace of the timed part alone (go
// tool trace -pprof=sched|sync|syscall splits the latency into waiting for a
// CPU, for a lock or channel, and for fsync), and -keysvc.log json runs the
// service with the Info-level JSON logger a deployment has, to a file.

var (
	// timedProfile writes a CPU profile of the timed part alone (go test's
	// -cpuprofile also covers the quoting before it, which the simulator
	// dominates).
	timedProfile = flag.String("keysvc.timedprofile", "", "write a CPU profile of the unlock benchmarks' timed part to `file`")
	timedTrace   = flag.String("keysvc.timedtrace", "", "write an execution trace of the unlock benchmarks' timed part to `file` (go tool trace)")
	benchLog     = flag.String("keysvc.log", "discard", "the unlock benchmarks' service logger: discard, or json (Info, to a file as a deployment would)")
	offeredRate  = flag.Float64("keysvc.rate", 1500, "BenchmarkUnlockOpenLoop's offered load, unlocks per second")
	benchDB      = flag.String("keysvc.db", "sqlite", "the unlock benchmarks' database: sqlite, postgres (one replica on a private PostgreSQL server) postgres2 (two replicas on it, the clients split between them) or postgres2sync (the same on a primary with a synchronous standby, as an HA deployment runs)")
)

const benchClients = 256

// unlockLoad is a running service with b.N precomputed unlock requests.
type unlockLoad struct {
	bodies [][]byte // request i's JSON body, sent by client i%benchClients
	conns  []*env   // one connection per client, already open
}

// newUnlockLoad enrolls vms VMs and precomputes b.N unlock requests, client
// c unlocking VM c%vms.
func newUnlockLoad(b *testing.B, vms int) *unlockLoad {
	opts := []keysvc.Option{keysvc.WithRateLimits(0, 0), keysvc.WithChallengeTTL(time.Hour)}
	switch *benchLog {
	case "discard":
	case "json":
		f, err := os.Create(filepath.Join(b.TempDir(), "keysvc.log"))
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { f.Close() })
		opts = append(opts, keysvc.WithLogger(slog.New(slog.NewJSONHandler(f, nil))))
	default:
		b.Fatalf("-keysvc.log %q: want discard or json", *benchLog)
	}
	var reps []*env
	switch *benchDB {
	case "sqlite":
		reps = []*env{startEnv(b, b.TempDir(), opts...)}
	case "postgres", "postgres2", "postgres2sync":
		var url string
		if *benchDB == "postgres2sync" {
			// Every commit also waits for the standby to flush it.
			primary := pgtest.New(b, pgtest.Options{Conf: pgtest.SyncReplication})
			primary.Standby(b)
			url = primary.NewDB(b)
		} else {
			url = pgtest.Shared(b).NewDB(b)
		}
		reps = []*env{startEnvWith(b, keysvc.Config{DataDir: b.TempDir(), DB: url}, opts...)}
		if *benchDB != "postgres" {
			reps = append(reps, startEnvWith(b, keysvc.Config{DataDir: replicaDir(b, reps[0].dir), DB: url}, opts...))
		}
	default:
		b.Fatalf("-keysvc.db %q: want sqlite, postgres, postgres2 or postgres2sync", *benchDB)
	}
	e := reps[0]
	v := openVM(b)
	names, vols := make([]string, vms), make([]string, vms)
	for i := range vms {
		names[i] = fmt.Sprintf("bench-%03d", i)
		vols[i] = setup(b, e, v, names[i])
	}
	l := &unlockLoad{bodies: make([][]byte, b.N), conns: make([]*env, benchClients)}
	for i := range l.bodies {
		vm := i % benchClients % vms
		ch := e.challenge(b, v, names[vm], vols[vm])
		body, err := json.Marshal(api.UnlockRequest{Challenge: ch.Challenge, Attestation: v.quote(b, ch.Nonce)})
		if err != nil {
			b.Fatal(err)
		}
		l.bodies[i] = body
	}
	var wg sync.WaitGroup
	for c := range l.conns {
		l.conns[c] = reps[c%len(reps)].from(b, "127.0.0.1")
		// Room for a whole request, so that it leaves in one write.
		l.conns[c].client.Transport.(*http.Transport).WriteBufferSize = 64 << 10
		wg.Go(func() {
			// Any answer will do: this only opens the connection.
			l.conns[c].post("/v1/session", struct{}{})
		})
	}
	wg.Wait()
	return l
}

// unlock sends request i from its client and fails unless it is answered
// 200. The body was encoded beforehand: what the load generator spends is
// taken from the same two cores as the service.
func (l *unlockLoad) unlock(i int) error {
	e := l.conns[i%benchClients]
	resp, err := e.client.Post("https://"+e.svc.VMAddr()+"/v1/unlock", "application/json", bytes.NewReader(l.bodies[i]))
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err == nil && resp.StatusCode != http.StatusOK {
		err = &unexpected{resp.StatusCode, string(body)}
	}
	return err
}

// timed runs fn as the benchmark's timed part, with the optional profile,
// and reports the process's CPU time per unlock: a figure the noise of a
// shared machine moves far less than a rate does, since time other
// processes take is not counted. It includes the load generator's client.
func timed(b *testing.B, fn func()) time.Duration {
	if *timedProfile != "" {
		f, err := os.Create(*timedProfile)
		if err != nil {
			b.Fatal(err)
		}
		defer f.Close()
		if err := pprof.StartCPUProfile(f); err != nil {
			b.Fatal(err)
		}
		defer pprof.StopCPUProfile()
	}
	if *timedTrace != "" {
		f, err := os.Create(*timedTrace)
		if err != nil {
			b.Fatal(err)
		}
		defer f.Close()
		if err := trace.Start(f); err != nil {
			b.Fatal(err)
		}
		defer trace.Stop()
	}
	cpu0 := cpuTime()
	b.ResetTimer()
	start := time.Now()
	fn()
	elapsed := time.Since(start)
	b.StopTimer()
	b.ReportMetric(float64((cpuTime()-cpu0).Microseconds())/float64(b.N), "cpu-µs/unlock")
	return elapsed
}

// cpuTime is the process's user and system CPU time.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// reportLatency reports p50, p90, p99, p99.9 and the maximum of lat: the
// shape of the tail tells a few stalls (p99.9 and max far above p99) from a
// queue that grows (p50 and p90 already high).
func reportLatency(b *testing.B, lat []time.Duration) {
	slices.Sort(lat)
	ms := func(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
	b.ReportMetric(ms(lat[len(lat)/2]), "p50-ms")
	b.ReportMetric(ms(lat[len(lat)*9/10]), "p90-ms")
	b.ReportMetric(ms(lat[len(lat)*99/100]), "p99-ms")
	b.ReportMetric(ms(lat[len(lat)*999/1000]), "p99.9-ms")
	b.ReportMetric(ms(lat[len(lat)-1]), "max-ms")
}

// firstErr keeps the first error reported from several goroutines.
type firstErr struct {
	mu  sync.Mutex
	err error
}

func (f *firstErr) set(err error) {
	f.mu.Lock()
	if f.err == nil {
		f.err = err
	}
	f.mu.Unlock()
}

// BenchmarkUnlock is the closed loop: 256 clients over 64 VMs (client c
// unlocks VM c%64, so four clients share a VM), each sending its next
// unlock as soon as the last is answered. It measures saturation
// throughput (unlocks/s); its latencies are those of a queue kept full, so
// in it mean latency is 256 / throughput, whatever the service does.
func BenchmarkUnlock(b *testing.B) {
	l := newUnlockLoad(b, 64)
	lat := make([]time.Duration, b.N)
	var fail firstErr
	elapsed := timed(b, func() {
		var wg sync.WaitGroup
		for c := range benchClients {
			wg.Go(func() {
				for i := c; i < b.N; i += benchClients {
					t0 := time.Now()
					if err := l.unlock(i); err != nil {
						fail.set(err)
					}
					lat[i] = time.Since(t0)
				}
			})
		}
		wg.Wait()
	})
	if fail.err != nil {
		b.Fatal(fail.err)
	}
	b.ReportMetric(float64(b.N)/elapsed.Seconds(), "unlocks/s")
	reportLatency(b, lat)
}

// BenchmarkUnlockOpenLoop is the open loop: 256 simulated VMs, one client
// each, and unlocks scheduled at a fixed offered rate (-keysvc.rate,
// 1500/s by default) whatever the answers: request i is due at
// start + i/rate, sent by client i%256. A client that is still waiting for
// its previous answer sends late, and a request's latency is measured from
// when it was due, not from when it was sent, so a slow service is not
// excused by the clients' waiting (no coordinated omission). It reports the
// achieved rate and p50/p99 latency at that load, and the p99 of the
// unlocks due after the first second (steady-p99-ms).
func BenchmarkUnlockOpenLoop(b *testing.B) {
	rate := *offeredRate
	if rate <= 0 {
		b.Fatalf("-keysvc.rate %v: want a positive rate", rate)
	}
	l := newUnlockLoad(b, benchClients)
	lat := make([]time.Duration, b.N)
	var fail firstErr
	elapsed := timed(b, func() {
		start := time.Now()
		var wg sync.WaitGroup
		for c := range benchClients {
			wg.Go(func() {
				for i := c; i < b.N; i += benchClients {
					due := start.Add(time.Duration(float64(i) / rate * float64(time.Second)))
					time.Sleep(time.Until(due))
					if err := l.unlock(i); err != nil {
						fail.set(err)
					}
					lat[i] = time.Since(due)
				}
			})
		}
		wg.Wait()
	})
	if fail.err != nil {
		b.Fatal(fail.err)
	}
	b.ReportMetric(rate, "offered/s")
	b.ReportMetric(float64(b.N)/elapsed.Seconds(), "unlocks/s")
	// The first second of load also pays for the service's cold start (the
	// first use of each database connection's statements, caches, the
	// runtime growing its heap): the p99 of the unlocks due after it is the
	// service's steady state, reported beside the whole run's.
	if warm := int(rate); b.N >= 2*warm {
		steady := slices.Clone(lat[warm:])
		slices.Sort(steady)
		b.ReportMetric(float64(steady[len(steady)*99/100].Microseconds())/1000, "steady-p99-ms")
	}
	reportLatency(b, lat)
}

type unexpected struct {
	code int
	body string
}

func (u *unexpected) Error() string { return fmt.Sprintf("unlock: %d %s", u.code, u.body) }
