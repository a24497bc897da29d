package main

import (
	"bytes"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/keygate/keygate/internal/cli"
	"github.com/keygate/keygate/keysvc"
	"github.com/keygate/keygate/keysvc/alert"
)

// alertFlags are serve's alert delivery flags.
type alertFlags struct {
	webhooks   []string
	secretFile string
	syslog     []string
	minSev     string
	caFile     string
	deadAge    time.Duration
}

// minWebhookSecret is the shortest webhook secret accepted.
const minWebhookSecret = 16

func (a *alertFlags) register(f *pflag.FlagSet) {
	f.StringArrayVar(&a.webhooks, "alert-webhook", nil, "POST each alert as signed JSON to this URL (repeatable; needs --alert-webhook-secret-file)")
	f.StringVar(&a.secretFile, "alert-webhook-secret-file", "", "file holding the webhook signing secret (X-Keygate-Signature: sha256=HMAC of the body)")
	f.StringArrayVar(&a.syslog, "alert-syslog", nil, "send each alert as RFC 5424 syslog to tcp://HOST:PORT or tls://HOST:PORT (repeatable)")
	f.StringVar(&a.minSev, "alert-min-severity", "warning", "deliver events of this severity and above: info, warning or critical")
	f.StringVar(&a.caFile, "alert-ca", "", "PEM file of CAs that HTTPS webhooks and TLS syslog servers must chain to (the system's roots otherwise)")
	f.DurationVar(&a.deadAge, "alert-dead-letter-age", alert.DefaultDeadLetterAge, "retry an undelivered alert for this long, then count it in keysvc_alert_dead_letters")
}

func (a *alertFlags) config(c *cobra.Command) (keysvc.AlertConfig, error) {
	cfg := keysvc.AlertConfig{Webhooks: a.webhooks, Syslog: a.syslog, MinSeverity: a.minSev, DeadLetterAge: a.deadAge}
	switch a.minSev {
	case "info", "warning", "critical":
	default:
		return cfg, cli.Usage(c, fmt.Errorf("--alert-min-severity %q: use info, warning or critical", a.minSev))
	}
	if a.deadAge <= 0 {
		return cfg, cli.Usage(c, fmt.Errorf("--alert-dead-letter-age %v: give a positive duration such as 72h", a.deadAge))
	}
	if len(a.webhooks) > 0 {
		if a.secretFile == "" {
			return cfg, cli.Usage(c, errors.New("--alert-webhook needs --alert-webhook-secret-file: the receiver checks each alert's signature with that secret"))
		}
		b, err := os.ReadFile(a.secretFile)
		if err != nil {
			return cfg, fmt.Errorf("--alert-webhook-secret-file: %w", err)
		}
		cfg.WebhookSecret = bytes.TrimSpace(b)
		if len(cfg.WebhookSecret) < minWebhookSecret {
			return cfg, fmt.Errorf("--alert-webhook-secret-file %s holds %d bytes; use at least %d random ones (e.g. `head -c 32 /dev/urandom | base64 > %s`)",
				a.secretFile, len(cfg.WebhookSecret), minWebhookSecret, a.secretFile)
		}
	} else if a.secretFile != "" {
		return cfg, cli.Usage(c, errors.New("--alert-webhook-secret-file without --alert-webhook: name the webhook URL too"))
	}
	if a.caFile != "" {
		var err error
		if cfg.CAs, err = loadPool("--alert-ca", a.caFile); err != nil {
			return cfg, err
		}
	}
	return cfg, nil
}

// loadPool reads a PEM file of CA certificates named by flag.
func loadPool(flag, file string) (*x509.CertPool, error) {
	b, err := os.ReadFile(file)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", flag, err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(b) {
		return nil, fmt.Errorf("%s %s holds no PEM certificate", flag, file)
	}
	return pool, nil
}
