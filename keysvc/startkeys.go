package keysvc

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"

	"github.com/keygate/keygate/keysvc/audit"
	"github.com/keygate/keygate/keysvc/masterkey"
	"github.com/keygate/keygate/keysvc/masterkey/hsm"
	"github.com/keygate/keygate/keysvc/store"
)

// openKeySource picks where the master key lives: the PKCS#11 token of
// cfg.PKCS11, or DataDir/master.key.
func openKeySource(cfg Config) (keySource, error) {
	path := filepath.Join(cfg.DataDir, MasterKeyFile)
	if cfg.PKCS11 == nil {
		return fileSource{path: path}, nil
	}
	for _, p := range []string{path, path + masterkey.SealedSuffix} {
		if _, err := os.Stat(p); err == nil {
			return nil, fmt.Errorf("%s exists: this data directory's rows are sealed under a key file, not the HSM; start without --master-key-pkcs11, or start the HSM-backed service on a new data directory", p)
		}
	}
	tok, err := hsm.Open(*cfg.PKCS11)
	if err != nil {
		return nil, err
	}
	return hsmSource{tok: tok}, nil
}

// loadedKeys are the master keys Start loads. Outside a rotation, cur
// alone. In the middle of one, cur is the old key and next the new one;
// once the new key is installed, cur is the new key and installed is set.
type loadedKeys struct {
	cur, next masterkey.Master
	rot       *store.MasterKeyRotation
	installed bool
}

// loadRotationKeys finishes lk, whose cur Start loaded before opening the
// store (a key sealed to a TPM is unsealed only while Start runs, and the
// store may open later, see connect): if the store records a master-key
// rotation under way, it loads the key the rotation moves to, checking both
// against the fingerprints the rotation recorded.
func (lk *loadedKeys) loadRotationKeys(ctx context.Context, src keySource, st store.MasterKeyRotations) (err error) {
	if lk.rot, err = st.MasterKeyRotation(ctx); err != nil || lk.rot == nil {
		return err
	}
	fp, err := masterkey.Fingerprint(lk.cur)
	if err != nil {
		return err
	}
	switch fp {
	case lk.rot.NewKey:
		lk.installed = true
	case lk.rot.OldKey:
		if lk.next, err = src.next(false); err != nil {
			if errors.Is(err, errNoNext) {
				err = fmt.Errorf("a master-key rotation to key %s is under way but that key is gone (master.key.next, or the token's object with the .next label): restore it from backup", lk.rot.NewKey)
			}
			return err
		}
		nfp, err := masterkey.Fingerprint(lk.next)
		if err != nil {
			return err
		}
		if nfp != lk.rot.NewKey {
			return fmt.Errorf("a master-key rotation to key %s is under way but the new key found is %s: restore the right one from backup", lk.rot.NewKey, nfp)
		}
	default:
		return fmt.Errorf("the master key %s is neither the old key (%s) nor the new key (%s) of the rotation the store records: restore the right key", fp, lk.rot.OldKey, lk.rot.NewKey)
	}
	return nil
}

// anchorKey is the key the store's anchor is MAC'd under: the new one
// from the start of a rotation.
func (lk loadedKeys) anchorKey() masterkey.Master {
	if lk.next != nil {
		return lk.next
	}
	return lk.cur
}

// resumeRotation wires master-key rotation into the Server and, if the
// store records one under way, takes it up again in the background.
func (svc *Service) resumeRotation(ctx context.Context, lk loadedKeys) error {
	s := svc.Server
	batch := s.rotBatch
	if batch <= 0 {
		batch = DefaultRotateBatch
	}
	rctx, cancel := context.WithCancel(context.Background())
	s.rot = &rotator{src: svc.src, st: svc.st, lg: svc.auditLog, batch: batch, hook: s.rotHook, ctx: rctx, cancel: cancel}
	if lk.rot == nil {
		return nil
	}
	var prev MasterKey
	next := lk.next
	if lk.installed {
		next = lk.cur
	} else {
		prev = lk.cur
		if err := svc.auditLog.Resume(lk.next); err != nil {
			return err
		}
	}
	if err := s.resumeKeys(ctx, next, prev); err != nil {
		return err
	}
	s.record(ctx, audit.Event{Actor: "keysvc", Action: audit.ActionMasterKeyRotate, Subject: "master-key",
		Details: audit.MasterKeyRotate{Phase: audit.RotateResume, OldKey: lk.rot.OldKey, NewKey: lk.rot.NewKey, Kind: svc.src.kind(), VMs: lk.rot.VMs, Volumes: lk.rot.Volumes}})
	svc.log.Info("resuming the master-key rotation under way", slog.String("old_key", lk.rot.OldKey), slog.String("new_key", lk.rot.NewKey),
		slog.Int("vms_done", lk.rot.VMs), slog.Int("volumes_done", lk.rot.Volumes), slog.Bool("new_key_installed", lk.installed))
	s.startRotation()
	return nil
}
