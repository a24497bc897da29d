package keysvc

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/keygate/keygate/keysvc/audit"
	"github.com/keygate/keygate/keysvc/masterkey"
	"github.com/keygate/keygate/keysvc/store"
)

// Files in a data directory.
const (
	MasterKeyFile  = "master.key"
	CAFile         = "ca.pem"
	CAKeyFile      = "ca.key"
	CertFile       = "server.pem"
	CertKeyFile    = "server.key"
	AdminTokenFile = "admin.token"
)

// DataDir is a key service's data directory with its TLS material and admin
// token, as Bootstrap left it.
type DataDir struct {
	Dir string
	// Created lists the files Bootstrap made on this call (empty when every
	// file was reused).
	Created []string
	// CAFingerprint is the SHA-256 of the CA certificate (DER), hex: what a
	// VM pins.
	CAFingerprint string
	caSum         [32]byte
	cert          tls.Certificate
	adminToken    string
}

// Path returns the path of a file in the data directory.
func (d *DataDir) Path(name string) string { return filepath.Join(d.Dir, name) }

// DefaultHostnames are always in the server certificate.
var DefaultHostnames = []string{"localhost", "127.0.0.1", "::1"}

// Bootstrap prepares dir: on first use it creates a CA (ECDSA P-256,
// self-signed, ca.pem and ca.key), a server certificate signed by it for
// DefaultHostnames plus hostnames (server.pem, server.key), and an admin
// token (admin.token: 32 random bytes, hex). Later calls reuse them; the
// server certificate is reissued by the same CA when it lacks one of
// hostnames or expires within 30 days. Private keys and the token are 0600,
// the directory 0700. The master key is not made here (masterkey.LoadOrCreate
// does, in Start).
func Bootstrap(dir string, hostnames []string, now time.Time) (*DataDir, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("bootstrap %s: %w", dir, err)
	}
	d := &DataDir{Dir: dir}
	caCert, caKey, err := d.loadOrCreateCA(now)
	if err != nil {
		return nil, fmt.Errorf("bootstrap %s: %w", dir, err)
	}
	d.caSum = sha256.Sum256(caCert.Raw)
	d.CAFingerprint = hex.EncodeToString(d.caSum[:])
	names := append(slices.Clone(DefaultHostnames), hostnames...)
	if err := d.loadOrIssueCert(caCert, caKey, names, now); err != nil {
		return nil, fmt.Errorf("bootstrap %s: %w", dir, err)
	}
	// Serve the CA after the leaf, so that a VM that pins only the CA's
	// fingerprint (from the volume's keygate token, without --ca) can check it.
	d.cert.Certificate = append(d.cert.Certificate, caCert.Raw)
	if err := d.loadOrCreateToken(); err != nil {
		return nil, fmt.Errorf("bootstrap %s: %w", dir, err)
	}
	return d, nil
}

// writeNew writes a file that must not exist yet, completely or not at all.
func (d *DataDir) writeNew(name string, data []byte, mode os.FileMode) error {
	tmp, err := os.CreateTemp(d.Dir, "."+name+".tmp*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if err := tmp.Chmod(mode); err != nil {
		tmp.Close()
		return err
	}
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp.Name(), d.Path(name)); err != nil {
		return err
	}
	d.Created = append(d.Created, name)
	return nil
}

// readPrivate reads a file that must not be readable by group or others.
func (d *DataDir) readPrivate(name string) ([]byte, error) {
	fi, err := os.Stat(d.Path(name))
	if err != nil {
		return nil, err
	}
	if fi.Mode().Perm()&0o077 != 0 {
		return nil, fmt.Errorf("%s has mode %v; it holds a secret: chmod 600 %s", d.Path(name), fi.Mode().Perm(), d.Path(name))
	}
	return os.ReadFile(d.Path(name))
}

func newKey() (*ecdsa.PrivateKey, []byte, error) {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	der, err := x509.MarshalPKCS8PrivateKey(k)
	if err != nil {
		return nil, nil, err
	}
	return k, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), nil
}

func serial() *big.Int {
	n, _ := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	return n
}

func (d *DataDir) loadOrCreateCA(now time.Time) (*x509.Certificate, *ecdsa.PrivateKey, error) {
	certPEM, err := os.ReadFile(d.Path(CAFile))
	if errors.Is(err, fs.ErrNotExist) {
		k, keyPEM, err := newKey()
		if err != nil {
			return nil, nil, fmt.Errorf("make CA key: %w", err)
		}
		tmpl := &x509.Certificate{
			SerialNumber:          serial(),
			Subject:               pkix.Name{CommonName: "keysvc CA", Organization: []string{"keygate"}},
			NotBefore:             now.Add(-time.Hour),
			NotAfter:              now.AddDate(10, 0, 0),
			KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
			BasicConstraintsValid: true,
			IsCA:                  true,
			MaxPathLenZero:        true,
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &k.PublicKey, k)
		if err != nil {
			return nil, nil, fmt.Errorf("make CA certificate: %w", err)
		}
		if err := d.writeNew(CAKeyFile, keyPEM, 0o600); err != nil {
			return nil, nil, fmt.Errorf("write CA key: %w", err)
		}
		if err := d.writeNew(CAFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644); err != nil {
			return nil, nil, fmt.Errorf("write CA certificate: %w", err)
		}
		cert, err := x509.ParseCertificate(der)
		return cert, k, err
	}
	if err != nil {
		return nil, nil, fmt.Errorf("read CA certificate: %w", err)
	}
	keyPEM, err := d.readPrivate(CAKeyFile)
	if err != nil {
		return nil, nil, fmt.Errorf("read CA key (restore %s from backup, or move the data directory aside to start afresh): %w", CAKeyFile, err)
	}
	pair, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		return nil, nil, fmt.Errorf("load CA: %v", err)
	}
	k, ok := pair.PrivateKey.(*ecdsa.PrivateKey)
	if !ok {
		return nil, nil, errors.New("load CA: key is not ECDSA")
	}
	cert, err := x509.ParseCertificate(pair.Certificate[0])
	return cert, k, err
}

func (d *DataDir) loadOrIssueCert(ca *x509.Certificate, caKey *ecdsa.PrivateKey, names []string, now time.Time) error {
	certPEM, err1 := os.ReadFile(d.Path(CertFile))
	keyPEM, err2 := d.readPrivate(CertKeyFile)
	if err1 == nil && err2 == nil {
		pair, err := tls.X509KeyPair(certPEM, keyPEM)
		if err == nil {
			leaf, err := x509.ParseCertificate(pair.Certificate[0])
			if err == nil && covers(leaf, names) && now.Add(30*24*time.Hour).Before(leaf.NotAfter) && leaf.CheckSignatureFrom(ca) == nil {
				d.cert = pair
				return nil
			}
		}
	} else if !errors.Is(err1, fs.ErrNotExist) && err1 != nil {
		return fmt.Errorf("read server certificate: %w", err1)
	} else if err2 != nil && !errors.Is(err2, fs.ErrNotExist) {
		return fmt.Errorf("read server key: %w", err2)
	}
	k, keyPEM, err := newKey()
	if err != nil {
		return fmt.Errorf("make server key: %w", err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial(),
		Subject:      pkix.Name{CommonName: "keysvc", Organization: []string{"keygate"}},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.AddDate(1, 0, 0),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	for _, n := range names {
		if ip := net.ParseIP(strings.Trim(n, "[]")); ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		} else if n != "" {
			tmpl.DNSNames = append(tmpl.DNSNames, n)
		}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &k.PublicKey, caKey)
	if err != nil {
		return fmt.Errorf("issue server certificate: %w", err)
	}
	certPEM = pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	// The key first: a certificate without its key would not load.
	if err := d.replace(CertKeyFile, keyPEM, 0o600); err != nil {
		return fmt.Errorf("write server key: %w", err)
	}
	if err := d.replace(CertFile, certPEM, 0o644); err != nil {
		return fmt.Errorf("write server certificate: %w", err)
	}
	d.cert, err = tls.X509KeyPair(certPEM, keyPEM)
	return err
}

// replace is writeNew for a file that may exist.
func (d *DataDir) replace(name string, data []byte, mode os.FileMode) error {
	return d.writeNew(name, data, mode)
}

func covers(c *x509.Certificate, names []string) bool {
	for _, n := range names {
		if n == "" {
			continue
		}
		if c.VerifyHostname(strings.Trim(n, "[]")) != nil {
			return false
		}
	}
	return true
}

// newToken returns a fresh admin token: 32 random bytes, hex.
func newToken() (string, error) {
	var raw [32]byte
	if _, err := rand.Read(raw[:]); err != nil {
		return "", fmt.Errorf("make admin token: %w", err)
	}
	return hex.EncodeToString(raw[:]), nil
}

func (d *DataDir) loadOrCreateToken() error {
	b, err := d.readPrivate(AdminTokenFile)
	if errors.Is(err, fs.ErrNotExist) {
		tok, err := newToken()
		if err != nil {
			return err
		}
		if err := d.writeNew(AdminTokenFile, []byte(tok+"\n"), 0o600); err != nil {
			return fmt.Errorf("write admin token: %w", err)
		}
		d.adminToken = tok
		return nil
	}
	if err != nil {
		return fmt.Errorf("read admin token: %w", err)
	}
	d.adminToken = strings.TrimSpace(string(b))
	if len(d.adminToken) < 32 {
		return fmt.Errorf("admin token in %s is shorter than 32 characters; delete the file to have a new one made", d.Path(AdminTokenFile))
	}
	return nil
}

// TLSConfig returns the server TLS configuration: TLS 1.3 only, with the
// data directory's server certificate.
func (d *DataDir) TLSConfig() *tls.Config {
	return &tls.Config{MinVersion: tls.VersionTLS13, Certificates: []tls.Certificate{d.cert}}
}

// RotateAdminToken replaces dir's admin token with a fresh one and records
// the rotation in the audit chain (action "rotate", subject "admin-token";
// never the token). It works on the data directory, not through the admin
// API, so that it also serves when the old token is lost or leaked: whoever
// can write dir can already read the token and the master key.
//
// A running service keeps accepting the old token, and refuses the new one,
// until it is restarted: the token is read once, at start. Stop the service
// first, or restart it right after.
//
// The master key is needed to MAC the audit record; if it is sealed to a TPM
// the caller installs the Sealer (masterkey.UseSealer) first. Nothing is
// created: a directory without a master key and a database is refused. The
// new token is written to a temporary file first and renamed into place only
// after the audit record is stored, so a failure leaves the old token.
//
// db names the database as Config.DB does ("" for DIR/keysvc.db). With
// several replicas, copy the new token to every replica's data directory and
// restart them all.
func RotateAdminToken(ctx context.Context, dir, db string) (path string, err error) {
	d := &DataDir{Dir: dir}
	need := []string{store.DBFile, AdminTokenFile}
	if store.IsPostgresURL(db) {
		need = need[1:]
	}
	for _, name := range need {
		if _, err := os.Stat(d.Path(name)); err != nil {
			return "", fmt.Errorf("rotate admin token: %s: %w (is --data the service's data directory? start the service once to create it)", d.Path(name), err)
		}
	}
	_, errPlain := os.Stat(d.Path(MasterKeyFile))
	_, errSealed := os.Stat(d.Path(MasterKeyFile) + masterkey.SealedSuffix)
	if errPlain != nil && errSealed != nil {
		return "", fmt.Errorf("rotate admin token: no master key in %s (restore master.key or master.key.tpm from backup)", dir)
	}
	mk, _, err := masterkey.LoadOrCreate(d.Path(MasterKeyFile))
	if err != nil {
		return "", fmt.Errorf("rotate admin token: master key: %w", err)
	}
	defer mk.Destroy()
	st, err := store.Open(ctx, db, dir)
	if err != nil {
		return "", fmt.Errorf("rotate admin token: %w", err)
	}
	defer st.Close()
	if err := checkMasterKey(ctx, st, mk); err != nil {
		return "", fmt.Errorf("rotate admin token: %w", err)
	}
	log, err := audit.New(st, mk)
	if err != nil {
		return "", fmt.Errorf("rotate admin token: %w", err)
	}
	defer log.Destroy()

	tok, err := newToken()
	if err != nil {
		return "", fmt.Errorf("rotate admin token: %w", err)
	}
	tmp, err := os.CreateTemp(dir, "."+AdminTokenFile+".tmp*") // 0600
	if err != nil {
		return "", fmt.Errorf("rotate admin token: %w", err)
	}
	defer os.Remove(tmp.Name()) // after the rename, a no-op
	_, err = tmp.WriteString(tok + "\n")
	if err == nil {
		err = tmp.Chmod(0o600)
	}
	if err == nil {
		err = tmp.Sync()
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return "", fmt.Errorf("rotate admin token: write %s: %w", tmp.Name(), err)
	}
	if _, err := log.Append(ctx, audit.Event{Actor: "operator", Action: audit.ActionRotate, Subject: "admin-token",
		Details: audit.Admin{Method: "local", Path: "keysvc admin-token rotate"}}); err != nil {
		return "", fmt.Errorf("rotate admin token: audit: %w (the old token is unchanged)", err)
	}
	if err := os.Rename(tmp.Name(), d.Path(AdminTokenFile)); err != nil {
		return "", fmt.Errorf("rotate admin token: install %s: %w (the rotation is audited but the old token is still in place; run the command again)", d.Path(AdminTokenFile), err)
	}
	if f, err := os.Open(dir); err == nil {
		f.Sync()
		f.Close()
	}
	return d.Path(AdminTokenFile), nil
}
