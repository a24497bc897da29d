package keysvc

import (
	"context"
	"errors"
	"fmt"
	"os"

	"github.com/keygate/keygate/keysvc/audit"
	"github.com/keygate/keygate/keysvc/masterkey"
	"github.com/keygate/keygate/keysvc/store"
)

// MigrateReport is what MigrateToPostgres copied and verified.
type MigrateReport struct {
	Copied store.CopyCounts `json:"copied"`
	// Audit is the verification of the chain in PostgreSQL after the copy.
	AuditRecords uint64 `json:"audit_records"`
	AuditHead    uint64 `json:"audit_head"`
}

// MigrateToPostgres copies the SQLite store of the data directory dir into
// the empty PostgreSQL database url names, and verifies the copied audit
// chain under dir's master key (installed Sealer first, if it is sealed to
// a TPM). The source chain is verified first: a broken chain is not copied.
// The service must be stopped: writes made during the copy are not copied.
func MigrateToPostgres(ctx context.Context, dir, url string) (MigrateReport, error) {
	var rep MigrateReport
	d := &DataDir{Dir: dir}
	if _, err := os.Stat(d.Path(store.DBFile)); err != nil {
		return rep, fmt.Errorf("migrate: %w (give --from the key service's data directory or its keysvc.db)", err)
	}
	_, errPlain := os.Stat(d.Path(MasterKeyFile))
	_, errSealed := os.Stat(d.Path(MasterKeyFile) + masterkey.SealedSuffix)
	if errPlain != nil && errSealed != nil {
		return rep, fmt.Errorf("migrate: no master key in %s: the copy is verified under it (restore master.key or master.key.tpm from backup)", dir)
	}
	mk, _, err := masterkey.LoadOrCreate(d.Path(MasterKeyFile))
	if err != nil {
		return rep, fmt.Errorf("migrate: master key: %w", err)
	}
	defer mk.Destroy()
	src, err := store.OpenSQLite(ctx, dir)
	if err != nil {
		return rep, fmt.Errorf("migrate: %w", err)
	}
	defer src.Close()
	before, err := verifyChain(ctx, src, mk)
	if err != nil {
		return rep, fmt.Errorf("migrate: the SQLite store's audit chain: %w (nothing was copied; run `keysvc audit verify` and repair it first)", err)
	}
	if err := checkMasterKey(ctx, src, mk); err != nil {
		return rep, fmt.Errorf("migrate: %w", err)
	}
	// The copy carries no rotation state: rows half re-keyed would be
	// copied without what says which key each is under.
	if rot, err := src.MasterKeyRotation(ctx); err != nil {
		return rep, fmt.Errorf("migrate: %w", err)
	} else if rot != nil {
		return rep, fmt.Errorf("migrate: a master-key rotation is under way in the SQLite store (to key %s): start keysvc on it to finish the rotation, stop it, then migrate", rot.NewKey)
	}
	dst, err := store.OpenPostgres(ctx, url)
	if err != nil {
		return rep, fmt.Errorf("migrate: %w", err)
	}
	defer dst.Close()
	if rep.Copied, err = store.CopyToPostgres(ctx, src, dst); err != nil {
		return rep, fmt.Errorf("migrate: %w", err)
	}
	after, err := verifyChain(ctx, dst, mk)
	if err != nil {
		return rep, fmt.Errorf("migrate: the copied audit chain does not verify: %w (drop and recreate the target database before trying again)", err)
	}
	if after.Records != before.Records || after.Head != before.Head {
		return rep, fmt.Errorf("migrate: the copy holds %d audit records up to head %d, the source %d up to %d (drop and recreate the target database before trying again)",
			after.Records, after.Head, before.Records, before.Head)
	}
	rep.AuditRecords, rep.AuditHead = after.Records, after.Head
	return rep, nil
}

// verifyChain verifies st's audit chain under mk.
func verifyChain(ctx context.Context, st store.AuditLog, mk masterkey.Master) (audit.Report, error) {
	lg, err := audit.New(st, mk)
	if err != nil {
		return audit.Report{}, err
	}
	defer lg.Destroy()
	rep, err := lg.Verify(ctx)
	if err != nil {
		return rep, err
	}
	if !rep.OK() {
		errs := []error{}
		for _, p := range rep.Problems {
			errs = append(errs, errors.New(p.String()))
		}
		return rep, fmt.Errorf("%d problems: %w", len(rep.Problems)+rep.Omitted, errors.Join(errs...))
	}
	return rep, nil
}
