// Package pgtest runs private PostgreSQL servers for tests: initdb in a
// temporary directory, pg_ctl as the postgres OS user (PostgreSQL refuses to
// run as root), listening only on a unix socket in that directory. It never
// touches a system cluster. Servers are small (shared_buffers 16MB) and
// durable (fsync on): the store's durability is what the tests check.
//
// A test that needs PostgreSQL and cannot have it skips with a reason, or
// fails where KEYGATE_REQUIRE names "postgresql" (package testutil).
package pgtest

import (
	"context"
	"fmt"
	"net/url"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/keygate/keygate/internal/testutil"
)

// Feature is the KEYGATE_REQUIRE name of a runnable PostgreSQL server.
const Feature = "postgresql"

// Port is the port every cluster uses: each has its own socket directory,
// so the number only names the socket file.
const Port = 5432

// Cluster is one private PostgreSQL server.
type Cluster struct {
	Dir     string // root of the cluster's files (owned by postgres)
	Data    string // the data directory
	SockDir string // the unix socket's directory
	bin     string
	uid     uint32
	gid     uint32
	dbs     atomic.Int64
}

// binDir finds Debian's PostgreSQL binaries, newest version first.
func binDir() (string, error) {
	m, _ := filepath.Glob("/usr/lib/postgresql/*/bin/initdb")
	if len(m) == 0 {
		if p, err := exec.LookPath("initdb"); err == nil {
			return filepath.Dir(p), nil
		}
		return "", fmt.Errorf("no initdb under /usr/lib/postgresql/*/bin or on PATH (apt-get install postgresql)")
	}
	best, bestV := "", -1
	for _, p := range m {
		v, _ := strconv.Atoi(filepath.Base(filepath.Dir(filepath.Dir(p))))
		if v > bestV {
			best, bestV = filepath.Dir(p), v
		}
	}
	return best, nil
}

// available checks what a cluster needs; the error says what is missing.
func available() (bin string, uid, gid uint32, err error) {
	if os.Geteuid() != 0 {
		return "", 0, 0, fmt.Errorf("tests must run as root to start PostgreSQL as the postgres user")
	}
	if bin, err = binDir(); err != nil {
		return "", 0, 0, err
	}
	u, err := user.Lookup("postgres")
	if err != nil {
		return "", 0, 0, fmt.Errorf("no postgres OS user (apt-get install postgresql creates it): %v", err)
	}
	u64, _ := strconv.ParseUint(u.Uid, 10, 32)
	g64, _ := strconv.ParseUint(u.Gid, 10, 32)
	return bin, uint32(u64), uint32(g64), nil
}

// Options adjust a new cluster.
type Options struct {
	// Conf lines are appended to postgresql.conf.
	Conf []string
	// NoInit leaves the data directory empty (for pg_basebackup).
	NoInit bool
}

// New makes and starts a cluster, stopped and removed in t's cleanup. It
// skips (or fails, see testutil.Skip) where PostgreSQL cannot run.
func New(t testing.TB, o Options) *Cluster {
	t.Helper()
	bin, uid, gid, err := available()
	if err != nil {
		testutil.Skip(t, Feature, err.Error())
	}
	c, err := create(bin, uid, gid, o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Destroy() })
	if !o.NoInit {
		if err := c.Start(); err != nil {
			t.Fatal(err)
		}
	}
	return c
}

func create(bin string, uid, gid uint32, o Options) (*Cluster, error) {
	dir, err := os.MkdirTemp("", "kgpg")
	if err != nil {
		return nil, err
	}
	c := &Cluster{Dir: dir, Data: filepath.Join(dir, "data"), SockDir: filepath.Join(dir, "s"), bin: bin, uid: uid, gid: gid}
	for _, d := range []string{c.SockDir} {
		if err := os.Mkdir(d, 0o700); err != nil {
			return nil, err
		}
	}
	for _, d := range []string{dir, c.SockDir} {
		if err := os.Chown(d, int(uid), int(gid)); err != nil {
			os.RemoveAll(dir)
			return nil, err
		}
	}
	if o.NoInit {
		err := os.Mkdir(c.Data, 0o700)
		if err == nil {
			err = os.Chown(c.Data, int(uid), int(gid))
		}
		return c, err
	}
	if out, err := c.run("initdb", "-D", c.Data, "-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8", "--locale=C"); err != nil {
		os.RemoveAll(dir)
		return nil, fmt.Errorf("initdb: %v\n%s", err, out)
	}
	conf := append([]string{
		"listen_addresses = ''",
		"unix_socket_directories = '" + c.SockDir + "'",
		"port = " + strconv.Itoa(Port),
		"shared_buffers = 16MB",
		"max_connections = 200", // each store keeps its pool open: 8 connections
		"fsync = on",
		"synchronous_commit = on",
		"max_wal_size = 64MB",
		"logging_collector = off",
		"log_min_messages = warning",
	}, o.Conf...)
	return c, c.AppendConf(conf...)
}

// AppendConf appends lines to the cluster's postgresql.conf.
func (c *Cluster) AppendConf(lines ...string) error {
	f, err := os.OpenFile(filepath.Join(c.Data, "postgresql.conf"), os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	_, err = f.WriteString(strings.Join(lines, "\n") + "\n")
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

// run runs one of PostgreSQL's programs as the postgres user.
func (c *Cluster) run(prog string, args ...string) ([]byte, error) {
	cmd := exec.Command(filepath.Join(c.bin, prog), args...)
	cmd.Dir = c.Dir
	cmd.Env = []string{"PATH=/usr/bin:/bin", "LC_ALL=C", "HOME=" + c.Dir}
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: c.uid, Gid: c.gid}}
	return cmd.CombinedOutput()
}

// Run runs one of PostgreSQL's programs (pg_basebackup, pg_ctl, …) as the
// postgres user, in the cluster's directory.
func (c *Cluster) Run(prog string, args ...string) ([]byte, error) { return c.run(prog, args...) }

// Start starts the server and waits until it takes connections.
func (c *Cluster) Start() error {
	logf := filepath.Join(c.Dir, "server.log")
	if out, err := c.run("pg_ctl", "start", "-w", "-t", "60", "-D", c.Data, "-l", logf); err != nil {
		log, _ := os.ReadFile(logf)
		return fmt.Errorf("pg_ctl start: %v\n%s\nserver log:\n%s", err, out, log)
	}
	return nil
}

// Stop stops the server; mode is smart, fast or immediate (a crash: no
// checkpoint, recovery on the next start).
func (c *Cluster) Stop(mode string) error {
	if out, err := c.run("pg_ctl", "stop", "-w", "-t", "60", "-m", mode, "-D", c.Data); err != nil {
		return fmt.Errorf("pg_ctl stop -m %s: %v\n%s", mode, err, out)
	}
	return nil
}

// Running reports whether the server's postmaster is up.
func (c *Cluster) Running() bool {
	_, err := c.run("pg_ctl", "status", "-D", c.Data)
	return err == nil
}

// Destroy stops the server if it runs and removes its files.
func (c *Cluster) Destroy() {
	if c.Running() {
		c.Stop("immediate")
	}
	os.RemoveAll(c.Dir)
}

// URL is a libpq URL for database db over the cluster's socket, as the
// superuser postgres.
func (c *Cluster) URL(db string) string {
	return "postgres://postgres@/" + db + "?host=" + url.QueryEscape(c.SockDir) + "&port=" + strconv.Itoa(Port)
}

// NewDB creates a fresh empty database and returns its URL. The database
// is dropped in t's cleanup (if the server still runs).
func (c *Cluster) NewDB(t testing.TB) string {
	t.Helper()
	name := fmt.Sprintf("t%d_%d", os.Getpid(), c.dbs.Add(1))
	if err := c.Exec("postgres", "CREATE DATABASE "+name); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if c.Running() {
			c.Exec("postgres", "DROP DATABASE IF EXISTS "+name+" WITH (FORCE)")
		}
	})
	return c.URL(name)
}

// Exec runs sql in database db.
func (c *Cluster) Exec(db, sql string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, c.URL(db))
	if err != nil {
		return fmt.Errorf("connect to %s: %w", db, err)
	}
	defer conn.Close(ctx)
	if _, err := conn.Exec(ctx, sql); err != nil {
		return fmt.Errorf("%s: %w", sql, err)
	}
	return nil
}

var (
	sharedMu  sync.Mutex
	shared    *Cluster
	sharedErr error
	inMain    bool
)

// Main runs a test binary's tests (call it from TestMain) and then stops
// the cluster Shared started, if any: one server for the whole binary.
func Main(m *testing.M) int {
	sharedMu.Lock()
	inMain = true
	sharedMu.Unlock()
	code := m.Run()
	sharedMu.Lock()
	defer sharedMu.Unlock()
	if shared != nil {
		shared.Destroy()
	}
	return code
}

// Shared returns the binary's one cluster, started on first use; use it
// with NewDB, one database per test. The package's TestMain must call Main,
// which stops it. Tests that stop or reconfigure a server use New instead.
func Shared(t testing.TB) *Cluster {
	t.Helper()
	bin, uid, gid, err := available()
	if err != nil {
		testutil.Skip(t, Feature, err.Error())
	}
	sharedMu.Lock()
	defer sharedMu.Unlock()
	if !inMain {
		t.Fatal("pgtest.Shared needs TestMain to call pgtest.Main (which stops the server)")
	}
	if shared == nil && sharedErr == nil {
		c, err := create(bin, uid, gid, Options{})
		if err == nil {
			if err = c.Start(); err != nil {
				c.Destroy()
			}
		}
		shared, sharedErr = c, err
		if err != nil {
			shared = nil
		}
	}
	if sharedErr != nil {
		t.Fatal(sharedErr)
	}
	return shared
}

// SyncReplication is the primary's configuration for Standby: streaming
// replication with one synchronous standby named "standby", so that a
// commit is acknowledged only once the standby has flushed it.
var SyncReplication = []string{
	"wal_level = replica",
	"max_wal_senders = 4",
	"synchronous_standby_names = 'standby'",
	"synchronous_commit = on",
}

// Standby makes a hot standby of c (started with SyncReplication) with
// pg_basebackup, starts it streaming from c as "standby", and waits until
// c counts it as its synchronous standby. It is stopped and removed in t's
// cleanup. Promote it with Promote.
func (c *Cluster) Standby(t testing.TB) *Cluster {
	t.Helper()
	s := New(t, Options{NoInit: true})
	if out, err := s.run("pg_basebackup", "-D", s.Data, "-h", c.SockDir, "-p", strconv.Itoa(Port), "-U", "postgres", "-X", "stream", "-R", "--no-sync"); err != nil {
		t.Fatalf("pg_basebackup: %v\n%s", err, out)
	}
	// The copy carries the primary's postgresql.conf: its own socket, no
	// synchronous standby of its own once promoted (commits would wait for
	// one forever), and its name for the primary's synchronous_standby_names.
	if err := s.AppendConf(
		"unix_socket_directories = '"+s.SockDir+"'",
		"synchronous_standby_names = ''",
		"hot_standby = on",
	); err != nil {
		t.Fatal(err)
	}
	// -R wrote primary_conninfo to postgresql.auto.conf, which is read last:
	// name the standby there.
	auto := "primary_conninfo = 'host=" + c.SockDir + " port=" + strconv.Itoa(Port) + " user=postgres application_name=standby'\n"
	if err := os.WriteFile(filepath.Join(s.Data, "postgresql.auto.conf"), []byte(auto), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(filepath.Join(s.Data, "postgresql.auto.conf"), int(s.uid), int(s.gid)); err != nil {
		t.Fatal(err)
	}
	if err := s.Start(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, c.URL("postgres"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	for {
		var state string
		err := conn.QueryRow(ctx, `SELECT sync_state FROM pg_stat_replication WHERE application_name = 'standby'`).Scan(&state)
		if err == nil && state == "sync" {
			return s
		}
		if ctx.Err() != nil {
			log, _ := os.ReadFile(filepath.Join(s.Dir, "server.log"))
			t.Fatalf("the standby did not become synchronous: %v (state %q); its log:\n%s", err, state, log)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// Promote makes a standby the primary and waits until it takes writes.
func (c *Cluster) Promote() error {
	if out, err := c.run("pg_ctl", "promote", "-w", "-t", "60", "-D", c.Data); err != nil {
		return fmt.Errorf("pg_ctl promote: %v\n%s", err, out)
	}
	return nil
}

// MultiHostURL is a libpq URL for database db that lists every cluster's
// socket, in order, and connects only to the one that takes writes
// (target_session_attrs=read-write): what replicas use to follow a
// failover.
func MultiHostURL(db string, cs ...*Cluster) string {
	hosts, ports := make([]string, len(cs)), make([]string, len(cs))
	for i, c := range cs {
		hosts[i], ports[i] = url.QueryEscape(c.SockDir), strconv.Itoa(Port)
	}
	return "postgres://postgres@/" + db + "?host=" + strings.Join(hosts, ",") + "&port=" + strings.Join(ports, ",") +
		"&target_session_attrs=read-write&connect_timeout=2"
}
