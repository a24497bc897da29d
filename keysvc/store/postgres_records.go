package store

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// pgVM scans a row of vmColumns (shared with SQLite) from pgx.
func pgVM(r pgx.Row) (VM, error) {
	var (
		v                VM
		ak               *string
		policy           string
		created, updated int64
	)
	if err := r.Scan(&v.Name, &v.EKPubPEM, &ak, &v.ProvisioningAllowed, &v.Revoked, &policy, &v.LearnArmed, &created, &updated, &v.MAC); err != nil {
		return VM{}, err
	}
	if ak != nil {
		v.AKPubPEM = *ak
	}
	v.Policy = json.RawMessage(policy)
	v.Created, v.Updated = fromNS(created), fromNS(updated)
	return v, nil
}

func pgVolume(r pgx.Row) (Volume, error) {
	var (
		v       Volume
		erased  *int64
		created int64
		rot     int64
	)
	if err := r.Scan(&v.ID, &v.VM, &v.SealedUK, &erased, &created, &v.MAC, &rot, &v.RotationPending); err != nil {
		return Volume{}, err
	}
	v.Rotation = uint64(rot)
	if len(v.SealedUK) == 0 {
		v.SealedUK = nil
	}
	if erased != nil {
		v.ErasedAt = fromNS(*erased)
	}
	v.Created = fromNS(created)
	return v, nil
}

func nullText(s string) *string {
	if s == "" {
		return nil
	}
	return &s
}

func isNoRowsPG(err error) bool { return errors.Is(err, pgx.ErrNoRows) }

// CreateVM implements VMs.
func (p *Postgres) CreateVM(ctx context.Context, v VM) (VM, error) {
	if err := checkVM(&v); err != nil {
		return VM{}, fmt.Errorf("create vm: %w", err)
	}
	now := time.Now().UTC()
	v.Created, v.Updated = now, now
	err := p.tx(ctx, func(ctx context.Context, tx pgx.Tx) error {
		tag, err := tx.Exec(ctx, `INSERT INTO vms (`+vmColumns+`) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) ON CONFLICT (name) DO NOTHING`,
			v.Name, v.EKPubPEM, nullText(v.AKPubPEM), v.ProvisioningAllowed, v.Revoked, string(v.Policy), v.LearnArmed, ns(now), ns(now), v.MAC)
		if err == nil && tag.RowsAffected() == 0 {
			return fmt.Errorf("vm %q: %w (choose another name, or update the existing VM)", v.Name, ErrExists)
		}
		return err
	})
	if err != nil {
		return VM{}, fmt.Errorf("create vm: %w", err)
	}
	return v, nil
}

// GetVM implements VMs.
func (p *Postgres) GetVM(ctx context.Context, name string) (VM, error) {
	ctx, cancel := bound(ctx)
	defer cancel()
	v, err := pgVM(p.pool.QueryRow(ctx, `SELECT `+vmColumns+` FROM vms WHERE name = $1`, name))
	if isNoRowsPG(err) {
		return VM{}, fmt.Errorf("get vm %q: %w (enroll it with `keysvc vm enroll`)", name, ErrNotFound)
	}
	if err != nil {
		return VM{}, fmt.Errorf("get vm %q: %w", name, classify(err))
	}
	return v, nil
}

// UpdateVM implements VMs: SELECT … FOR UPDATE, fn, UPDATE, in one
// transaction, so that concurrent updates from any replica apply one after
// another.
func (p *Postgres) UpdateVM(ctx context.Context, name string, fn func(*VM) error) (VM, error) {
	var out VM
	err := p.tx(ctx, func(ctx context.Context, tx pgx.Tx) error {
		old, err := pgVM(tx.QueryRow(ctx, `SELECT `+vmColumns+` FROM vms WHERE name = $1 FOR UPDATE`, name))
		if isNoRowsPG(err) {
			return fmt.Errorf("vm %q: %w", name, ErrNotFound)
		}
		if err != nil {
			return err
		}
		v := old
		v.Policy = bytes.Clone(old.Policy)
		if err := fn(&v); err != nil {
			return err
		}
		if v.Name != old.Name || !v.Created.Equal(old.Created) {
			return fmt.Errorf("vm %q: name and creation time: %w", name, ErrImmutable)
		}
		if err := checkVM(&v); err != nil {
			return err
		}
		v.Updated = time.Now().UTC()
		_, err = tx.Exec(ctx, `UPDATE vms SET ek_pub_pem = $1, ak_pub_pem = $2, provisioning_allowed = $3, revoked = $4,
			policy_json = $5, learn_armed = $6, updated_ns = $7, row_mac = $8 WHERE name = $9`,
			v.EKPubPEM, nullText(v.AKPubPEM), v.ProvisioningAllowed, v.Revoked, string(v.Policy), v.LearnArmed, ns(v.Updated), v.MAC, name)
		out = v
		return err
	})
	if err != nil {
		return VM{}, fmt.Errorf("update vm: %w", err)
	}
	return out, nil
}

// pgList runs query and scans every row.
func pgList[T any](ctx context.Context, p *Postgres, scan func(pgx.Row) (T, error), query string, args ...any) ([]T, error) {
	ctx, cancel := bound(ctx)
	defer cancel()
	rows, err := p.pool.Query(ctx, query, args...)
	if err != nil {
		return nil, classify(err)
	}
	out, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (T, error) { return scan(r) })
	return out, classify(err)
}

// ListVMs implements VMs.
func (p *Postgres) ListVMs(ctx context.Context) ([]VM, error) {
	out, err := pgList(ctx, p, pgVM, `SELECT `+vmColumns+` FROM vms ORDER BY name`)
	if err != nil {
		return nil, fmt.Errorf("list vms: %w", err)
	}
	return out, nil
}

// CreateVolume implements Volumes.
func (p *Postgres) CreateVolume(ctx context.Context, v Volume) (Volume, error) {
	if err := ValidID("volume id", v.ID); err != nil {
		return Volume{}, fmt.Errorf("create volume: %w", err)
	}
	if len(v.SealedUK) == 0 || !v.ErasedAt.IsZero() {
		return Volume{}, fmt.Errorf("create volume %q: a new volume needs a sealed UK and no erase time", v.ID)
	}
	v.Created = time.Now().UTC()
	v.SealedUK = bytes.Clone(v.SealedUK)
	err := p.tx(ctx, func(ctx context.Context, tx pgx.Tx) error {
		tag, err := tx.Exec(ctx, `INSERT INTO volumes (`+volumeColumns+`) VALUES ($1, $2, $3, NULL, $4, $5, 0, false) ON CONFLICT (id) DO NOTHING`,
			v.ID, v.VM, v.SealedUK, ns(v.Created), v.MAC)
		var pe *pgconn.PgError
		switch {
		case errors.As(err, &pe) && pe.Code == "23503": // foreign key: no such VM
			return fmt.Errorf("vm %q: %w (enroll the VM before creating its volumes)", v.VM, ErrNotFound)
		case err != nil:
			return err
		case tag.RowsAffected() == 0:
			return fmt.Errorf("volume %q: %w (volume IDs are never reused, even after erase)", v.ID, ErrExists)
		}
		return nil
	})
	if err != nil {
		return Volume{}, fmt.Errorf("create volume: %w", err)
	}
	return v, nil
}

// GetVolume implements Volumes.
func (p *Postgres) GetVolume(ctx context.Context, id string) (Volume, error) {
	ctx, cancel := bound(ctx)
	defer cancel()
	v, err := pgVolume(p.pool.QueryRow(ctx, `SELECT `+volumeColumns+` FROM volumes WHERE id = $1`, id))
	if isNoRowsPG(err) {
		return Volume{}, fmt.Errorf("get volume %q: %w", id, ErrNotFound)
	}
	if err != nil {
		return Volume{}, fmt.Errorf("get volume %q: %w", id, classify(err))
	}
	return v, nil
}

// UpdateVolume implements Volumes, as UpdateVM. Erasing sets sealed_uk to
// NULL; the old row version stays in the table's pages until VACUUM reuses
// them, and in the WAL and its archive and in base backups until they are
// recycled. As with SQLite, the erase is final once no copy of the master key
// can meet such a copy.
func (p *Postgres) UpdateVolume(ctx context.Context, id string, fn func(*Volume) error) (Volume, error) {
	var out Volume
	err := p.tx(ctx, func(ctx context.Context, tx pgx.Tx) error {
		old, err := pgVolume(tx.QueryRow(ctx, `SELECT `+volumeColumns+` FROM volumes WHERE id = $1 FOR UPDATE`, id))
		if isNoRowsPG(err) {
			return fmt.Errorf("volume %q: %w", id, ErrNotFound)
		}
		if err != nil {
			return err
		}
		v := old
		v.SealedUK = bytes.Clone(old.SealedUK)
		if err := fn(&v); err != nil {
			return err
		}
		if _, err := settleErase(old, &v, id); err != nil {
			return err
		}
		var erasedNS *int64
		if v.Erased() {
			n := ns(v.ErasedAt)
			erasedNS = &n
		}
		_, err = tx.Exec(ctx, `UPDATE volumes SET sealed_uk = $1, erased_ns = $2, row_mac = $3 WHERE id = $4`, v.SealedUK, erasedNS, v.MAC, id)
		out = v
		return err
	})
	if err != nil {
		return Volume{}, fmt.Errorf("update volume: %w", err)
	}
	return out, nil
}

// ListVolumes implements Volumes.
func (p *Postgres) ListVolumes(ctx context.Context, vm string) ([]Volume, error) {
	q, args := `SELECT `+volumeColumns+` FROM volumes ORDER BY id`, []any{}
	if vm != "" {
		q, args = `SELECT `+volumeColumns+` FROM volumes WHERE vm = $1 ORDER BY id`, []any{vm}
	}
	out, err := pgList(ctx, p, pgVolume, q, args...)
	if err != nil {
		return nil, fmt.Errorf("list volumes: %w", err)
	}
	return out, nil
}

// UseChallenge implements Challenges.
func (p *Postgres) UseChallenge(ctx context.Context, id string, expires time.Time) error {
	if id == "" {
		return fmt.Errorf("use challenge: empty id")
	}
	err := p.tx(ctx, func(ctx context.Context, tx pgx.Tx) error {
		tag, err := tx.Exec(ctx, `INSERT INTO used_challenges (id, expires_ns) VALUES ($1, $2) ON CONFLICT (id) DO NOTHING`, id, ns(expires))
		if err == nil && tag.RowsAffected() == 0 {
			return ErrChallengeUsed
		}
		return err
	})
	if err != nil {
		return fmt.Errorf("use challenge: %w", err)
	}
	return nil
}

// ChallengeUsed implements Challenges.
func (p *Postgres) ChallengeUsed(ctx context.Context, id string) (bool, error) {
	ctx, cancel := bound(ctx)
	defer cancel()
	var one int
	err := p.pool.QueryRow(ctx, qChallengeUsed, id).Scan(&one)
	switch {
	case err == nil:
		return true, nil
	case isNoRowsPG(err):
		return false, nil
	default:
		return false, fmt.Errorf("look up challenge: %w", classify(err))
	}
}

// pgDelete runs a DELETE and returns how many rows it removed.
func (p *Postgres) pgDelete(ctx context.Context, query string, args ...any) (int64, error) {
	var n int64
	err := p.tx(ctx, func(ctx context.Context, tx pgx.Tx) error {
		tag, err := tx.Exec(ctx, query, args...)
		n = tag.RowsAffected()
		return err
	})
	return n, err
}

// PurgeChallenges implements Challenges.
func (p *Postgres) PurgeChallenges(ctx context.Context, now time.Time) (int64, error) {
	n, err := p.pgDelete(ctx, `DELETE FROM used_challenges WHERE expires_ns <= $1`, ns(now))
	if err != nil {
		return 0, fmt.Errorf("purge challenges: %w", err)
	}
	return n, nil
}

// The unlock path's reads, named so that warm runs the same text (pgx
// caches a prepared statement per connection, keyed by its text).
const (
	qChallengeUsed = `SELECT 1 FROM used_challenges WHERE id = $1`
	// vmVolumeColumns are what both stores' getVMAndVolume scan, in order
	// (pgVM or scanVM, then the volume's).
	vmVolumeColumns = `vms.name, vms.ek_pub_pem, vms.ak_pub_pem, vms.provisioning_allowed, vms.revoked,
		vms.policy_json, vms.learn_armed, vms.created_ns, vms.updated_ns, vms.row_mac,
		volumes.id, volumes.vm, volumes.sealed_uk, volumes.erased_ns, volumes.created_ns, volumes.row_mac,
		volumes.rotation, volumes.rotation_pending,
		EXISTS (SELECT 1 FROM volume_rotations WHERE volume_rotations.volume = volumes.id)`
	qVMAndVolume      = `SELECT ` + vmVolumeColumns + ` FROM vms LEFT JOIN volumes ON volumes.id = $1 WHERE vms.name = $2`
	qVMAndVolumeUsing = `SELECT ` + vmVolumeColumns + `, EXISTS (SELECT 1 FROM used_challenges WHERE id = $3)
		FROM vms LEFT JOIN volumes ON volumes.id = $1 WHERE vms.name = $2`
	// qVMsAndVolumes reads several (vm, volume) pairs at once, each row
	// numbered by its pair's place in the arrays (from 1); a pair whose VM
	// does not exist has no row.
	qVMsAndVolumes = `SELECT ` + vmVolumeColumns + `, k.ord
		FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS k(vm, vol, ord)
		JOIN vms ON vms.name = k.vm LEFT JOIN volumes ON volumes.id = k.vol`
)

// GetVMAndVolume reads the named VM and the volume id in one query, as
// SQLite.GetVMAndVolume.
func (p *Postgres) GetVMAndVolume(ctx context.Context, vm, id string) (VM, *Volume, error) {
	v, vol, _, err := p.getVMAndVolume(ctx, vm, id, nil)
	return v, vol, err
}

// GetVMAndVolumeUsing implements Backend.
func (p *Postgres) GetVMAndVolumeUsing(ctx context.Context, vm, id, challenge string) (VM, *Volume, bool, error) {
	return p.getVMAndVolume(ctx, vm, id, &challenge)
}

// getVMAndVolume reads the VM and the volume, and whether challenge is used
// unless it is nil, in one query.
func (p *Postgres) getVMAndVolume(ctx context.Context, vm, id string, challenge *string) (VM, *Volume, bool, error) {
	ctx, cancel := bound(ctx)
	defer cancel()
	var (
		row   pgx.Row
		used  bool
		extra []any
	)
	if challenge == nil {
		row = p.pool.QueryRow(ctx, qVMAndVolume, id, vm)
	} else {
		row = p.pool.QueryRow(ctx, qVMAndVolumeUsing, id, vm, *challenge)
		extra = []any{&used}
	}
	v, vol, err := scanVMAndVolume(row, extra...)
	if isNoRowsPG(err) {
		return VM{}, nil, false, fmt.Errorf("get vm %q: %w (enroll it with `keysvc vm enroll`)", vm, ErrNotFound)
	}
	if err != nil {
		return VM{}, nil, false, fmt.Errorf("get vm %q and volume %q: %w", vm, id, classify(err))
	}
	return v, vol, used, nil
}

// scanVMAndVolume scans vmVolumeColumns and then extra: the VM, and the
// volume or nil if the row has none.
func scanVMAndVolume(row pgx.Row, extra ...any) (VM, *Volume, error) {
	var (
		volID, volVM       *string
		sealed, mac        []byte
		erased, volCreated *int64
		rot                *int64
		pending            *bool
		rotRow             bool
	)
	v, err := pgVM(scanTail{row, append([]any{&volID, &volVM, &sealed, &erased, &volCreated, &mac, &rot, &pending, &rotRow}, extra...)})
	if err != nil || volID == nil {
		return v, nil, err
	}
	vol := &Volume{ID: *volID, VM: *volVM, SealedUK: sealed, MAC: mac, Created: fromNS(*volCreated), RotationRow: rotRow}
	if rot != nil && pending != nil {
		vol.Rotation, vol.RotationPending = uint64(*rot), *pending
	}
	if len(vol.SealedUK) == 0 {
		vol.SealedUK = nil
	}
	if erased != nil {
		vol.ErasedAt = fromNS(*erased)
	}
	return v, vol, nil
}
