package store

import (
	"bytes"
	"context"
	"database/sql"
	"encoding/json"
	"fmt"
	"time"
)

const vmColumns = `name, ek_pub_pem, ak_pub_pem, provisioning_allowed, revoked, policy_json, learn_armed, created_ns, updated_ns, row_mac`

type rowScanner interface{ Scan(dest ...any) error }

func scanVM(r rowScanner) (VM, error) {
	var (
		v                VM
		ak               sql.NullString
		policy           string
		created, updated int64
	)
	if err := r.Scan(&v.Name, &v.EKPubPEM, &ak, &v.ProvisioningAllowed, &v.Revoked, &policy, &v.LearnArmed, &created, &updated, &v.MAC); err != nil {
		return VM{}, err
	}
	v.AKPubPEM = ak.String
	v.Policy = json.RawMessage(policy)
	v.Created, v.Updated = fromNS(created), fromNS(updated)
	return v, nil
}

func checkVM(v *VM) error {
	if err := ValidID("vm name", v.Name); err != nil {
		return err
	}
	if v.EKPubPEM == "" {
		return fmt.Errorf("vm %q: missing EK public key (give the PEM from `keygate tpm ek`)", v.Name)
	}
	if len(v.Policy) == 0 {
		v.Policy = json.RawMessage("{}")
	}
	if !json.Valid(v.Policy) {
		return fmt.Errorf("vm %q: policy is not valid JSON", v.Name)
	}
	return nil
}

func nullString(s string) sql.NullString { return sql.NullString{String: s, Valid: s != ""} }

// CreateVM implements VMs.
func (s *SQLite) CreateVM(ctx context.Context, v VM) (VM, error) {
	if err := checkVM(&v); err != nil {
		return VM{}, fmt.Errorf("create vm: %w", err)
	}
	now := time.Now().UTC()
	v.Created, v.Updated = now, now
	err := s.write(ctx, func(ctx context.Context, tx *sql.Tx) error {
		var one int
		err := tx.QueryRowContext(ctx, `SELECT 1 FROM vms WHERE name = ?`, v.Name).Scan(&one)
		if err == nil {
			return fmt.Errorf("vm %q: %w (choose another name, or update the existing VM)", v.Name, ErrExists)
		}
		if !isNoRows(err) {
			return err
		}
		_, err = tx.ExecContext(ctx, `INSERT INTO vms (`+vmColumns+`) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`,
			v.Name, v.EKPubPEM, nullString(v.AKPubPEM), v.ProvisioningAllowed, v.Revoked, string(v.Policy), v.LearnArmed, ns(now), ns(now), v.MAC)
		return err
	})
	if err != nil {
		return VM{}, fmt.Errorf("create vm: %w", err)
	}
	return v, nil
}

// GetVM implements VMs.
func (s *SQLite) GetVM(ctx context.Context, name string) (VM, error) {
	v, err := scanVM(s.queryRow(ctx, `SELECT `+vmColumns+` FROM vms WHERE name = ?`, name))
	if isNoRows(err) {
		return VM{}, fmt.Errorf("get vm %q: %w (enroll it with `keysvc vm enroll`)", name, ErrNotFound)
	}
	if err != nil {
		return VM{}, fmt.Errorf("get vm %q: %w", name, err)
	}
	return v, nil
}

// UpdateVM implements VMs.
func (s *SQLite) UpdateVM(ctx context.Context, name string, fn func(*VM) error) (VM, error) {
	var out VM
	err := s.write(ctx, func(ctx context.Context, tx *sql.Tx) error {
		old, err := scanVM(tx.QueryRowContext(ctx, `SELECT `+vmColumns+` FROM vms WHERE name = ?`, name))
		if isNoRows(err) {
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
		_, err = tx.ExecContext(ctx, `UPDATE vms SET ek_pub_pem = ?, ak_pub_pem = ?, provisioning_allowed = ?, revoked = ?,
			policy_json = ?, learn_armed = ?, updated_ns = ?, row_mac = ? WHERE name = ?`,
			v.EKPubPEM, nullString(v.AKPubPEM), v.ProvisioningAllowed, v.Revoked, string(v.Policy), v.LearnArmed, ns(v.Updated), v.MAC, name)
		out = v
		return err
	})
	if err != nil {
		return VM{}, fmt.Errorf("update vm: %w", err)
	}
	return out, nil
}

// ListVMs implements VMs.
func (s *SQLite) ListVMs(ctx context.Context) ([]VM, error) {
	rows, err := s.db.QueryContext(ctx, `SELECT `+vmColumns+` FROM vms ORDER BY name`)
	if err != nil {
		return nil, fmt.Errorf("list vms: %w", err)
	}
	defer rows.Close()
	var out []VM
	for rows.Next() {
		v, err := scanVM(rows)
		if err != nil {
			return nil, fmt.Errorf("list vms: %w", err)
		}
		out = append(out, v)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("list vms: %w", err)
	}
	return out, nil
}

const volumeColumns = `id, vm, sealed_uk, erased_ns, created_ns, row_mac, rotation, rotation_pending`

func scanVolume(r rowScanner) (Volume, error) {
	var (
		v       Volume
		erased  sql.NullInt64
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
	if erased.Valid {
		v.ErasedAt = fromNS(erased.Int64)
	}
	v.Created = fromNS(created)
	return v, nil
}

// CreateVolume implements Volumes.
func (s *SQLite) CreateVolume(ctx context.Context, v Volume) (Volume, error) {
	if err := ValidID("volume id", v.ID); err != nil {
		return Volume{}, fmt.Errorf("create volume: %w", err)
	}
	if len(v.SealedUK) == 0 || !v.ErasedAt.IsZero() {
		return Volume{}, fmt.Errorf("create volume %q: a new volume needs a sealed UK and no erase time", v.ID)
	}
	v.Created = time.Now().UTC()
	v.SealedUK = bytes.Clone(v.SealedUK)
	err := s.write(ctx, func(ctx context.Context, tx *sql.Tx) error {
		var one int
		err := tx.QueryRowContext(ctx, `SELECT 1 FROM vms WHERE name = ?`, v.VM).Scan(&one)
		if isNoRows(err) {
			return fmt.Errorf("vm %q: %w (enroll the VM before creating its volumes)", v.VM, ErrNotFound)
		}
		if err != nil {
			return err
		}
		err = tx.QueryRowContext(ctx, `SELECT 1 FROM volumes WHERE id = ?`, v.ID).Scan(&one)
		if err == nil {
			return fmt.Errorf("volume %q: %w (volume IDs are never reused, even after erase)", v.ID, ErrExists)
		}
		if !isNoRows(err) {
			return err
		}
		_, err = tx.ExecContext(ctx, `INSERT INTO volumes (`+volumeColumns+`) VALUES (?, ?, ?, NULL, ?, ?, 0, 0)`,
			v.ID, v.VM, v.SealedUK, ns(v.Created), v.MAC)
		return err
	})
	if err != nil {
		return Volume{}, fmt.Errorf("create volume: %w", err)
	}
	return v, nil
}

// GetVolume implements Volumes.
func (s *SQLite) GetVolume(ctx context.Context, id string) (Volume, error) {
	v, err := scanVolume(s.queryRow(ctx, `SELECT `+volumeColumns+` FROM volumes WHERE id = ?`, id))
	if isNoRows(err) {
		return Volume{}, fmt.Errorf("get volume %q: %w", id, ErrNotFound)
	}
	if err != nil {
		return Volume{}, fmt.Errorf("get volume %q: %w", id, err)
	}
	return v, nil
}

// UpdateVolume implements Volumes. Erasing (SealedUK set to nil) stamps
// ErasedAt and then truncates the WAL; see SQLite for what that does and does
// not scrub.
func (s *SQLite) UpdateVolume(ctx context.Context, id string, fn func(*Volume) error) (Volume, error) {
	var (
		out    Volume
		erased bool
	)
	err := s.write(ctx, func(ctx context.Context, tx *sql.Tx) error {
		old, err := scanVolume(tx.QueryRowContext(ctx, `SELECT `+volumeColumns+` FROM volumes WHERE id = ?`, id))
		if isNoRows(err) {
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
		if erased, err = settleErase(old, &v, id); err != nil {
			return err
		}
		var erasedNS sql.NullInt64
		if v.Erased() {
			erasedNS = sql.NullInt64{Int64: ns(v.ErasedAt), Valid: true}
		}
		_, err = tx.ExecContext(ctx, `UPDATE volumes SET sealed_uk = ?, erased_ns = ?, row_mac = ? WHERE id = ?`, v.SealedUK, erasedNS, v.MAC, id)
		out = v
		return err
	})
	if err != nil {
		return Volume{}, fmt.Errorf("update volume: %w", err)
	}
	if erased {
		s.truncateWAL(ctx)
	}
	return out, nil
}

// settleErase checks what an UpdateVolume fn did to v (read as old) and
// stamps ErasedAt; erasedNow reports that this update erases the volume.
func settleErase(old Volume, v *Volume, id string) (erasedNow bool, err error) {
	if len(v.SealedUK) == 0 {
		v.SealedUK = nil
	}
	switch {
	case v.ID != old.ID || v.VM != old.VM || !v.Created.Equal(old.Created):
		return false, fmt.Errorf("volume %q: id, vm and creation time: %w", id, ErrImmutable)
	case v.Rotation != old.Rotation || v.RotationPending != old.RotationPending:
		return false, fmt.Errorf("volume %q: its rotation state changes only through a rotation: %w", id, ErrImmutable)
	case old.Erased() && !v.Erased():
		return false, fmt.Errorf("volume %q is erased and cannot get a key back (create a new volume): %w", id, ErrImmutable)
	case old.Erased():
		v.ErasedAt = old.ErasedAt
	case v.Erased():
		v.ErasedAt = time.Now().UTC()
		return true, nil
	default:
		v.ErasedAt = time.Time{}
	}
	return false, nil
}

// ListVolumes implements Volumes.
func (s *SQLite) ListVolumes(ctx context.Context, vm string) ([]Volume, error) {
	q, args := `SELECT `+volumeColumns+` FROM volumes ORDER BY id`, []any{}
	if vm != "" {
		q, args = `SELECT `+volumeColumns+` FROM volumes WHERE vm = ? ORDER BY id`, []any{vm}
	}
	rows, err := s.db.QueryContext(ctx, q, args...)
	if err != nil {
		return nil, fmt.Errorf("list volumes: %w", err)
	}
	defer rows.Close()
	var out []Volume
	for rows.Next() {
		v, err := scanVolume(rows)
		if err != nil {
			return nil, fmt.Errorf("list volumes: %w", err)
		}
		out = append(out, v)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("list volumes: %w", err)
	}
	return out, nil
}

// UseChallenge implements Challenges.
func (s *SQLite) UseChallenge(ctx context.Context, id string, expires time.Time) error {
	if id == "" {
		return fmt.Errorf("use challenge: empty id")
	}
	err := s.write(ctx, func(ctx context.Context, tx *sql.Tx) error {
		return s.useChallenge(ctx, tx, ChallengeUse{ID: id, Expires: expires})
	})
	if err != nil {
		return fmt.Errorf("use challenge: %w", err)
	}
	return nil
}

// useChallenge inserts u inside tx; ErrChallengeUsed if it is there already.
func (s *SQLite) useChallenge(ctx context.Context, tx *sql.Tx, u ChallengeUse) error {
	res, err := s.txExec(ctx, tx, `INSERT INTO used_challenges (id, expires_ns) VALUES (?, ?) ON CONFLICT (id) DO NOTHING`, u.ID, ns(u.Expires))
	if err != nil {
		return err
	}
	n, err := res.RowsAffected()
	if err != nil {
		return err
	}
	if n == 0 {
		return ErrChallengeUsed
	}
	return nil
}

// ChallengeUsed implements Challenges.
func (s *SQLite) ChallengeUsed(ctx context.Context, id string) (bool, error) {
	var one int
	err := s.queryRow(ctx, `SELECT 1 FROM used_challenges WHERE id = ?`, id).Scan(&one)
	switch {
	case err == nil:
		return true, nil
	case isNoRows(err):
		return false, nil
	default:
		return false, fmt.Errorf("look up challenge: %w", err)
	}
}

// PurgeChallenges implements Challenges.
func (s *SQLite) PurgeChallenges(ctx context.Context, now time.Time) (int64, error) {
	var n int64
	err := s.write(ctx, func(ctx context.Context, tx *sql.Tx) error {
		res, err := tx.ExecContext(ctx, `DELETE FROM used_challenges WHERE expires_ns <= ?`, ns(now))
		if err != nil {
			return err
		}
		n, err = res.RowsAffected()
		return err
	})
	if err != nil {
		return 0, fmt.Errorf("purge challenges: %w", err)
	}
	return n, nil
}

// GetVMAndVolume reads the named VM and the volume id in one query (one
// snapshot): the unlock path needs both, twice, and a query costs more
// than the row. It returns ErrNotFound if the VM is not enrolled; a volume
// that does not exist (or belongs to another VM; check Volume.VM) comes
// back as nil.
func (s *SQLite) GetVMAndVolume(ctx context.Context, vm, id string) (VM, *Volume, error) {
	v, vol, _, err := s.getVMAndVolume(ctx, vm, id, nil)
	return v, vol, err
}

// GetVMAndVolumeUsing implements Backend.
func (s *SQLite) GetVMAndVolumeUsing(ctx context.Context, vm, id, challenge string) (VM, *Volume, bool, error) {
	return s.getVMAndVolume(ctx, vm, id, &challenge)
}

// SQLite's forms of qVMAndVolume and qVMAndVolumeUsing.
const (
	sqliteQVMAndVolume      = `SELECT ` + vmVolumeColumns + ` FROM vms LEFT JOIN volumes ON volumes.id = ?1 WHERE vms.name = ?2`
	sqliteQVMAndVolumeUsing = `SELECT ` + vmVolumeColumns + `, EXISTS (SELECT 1 FROM used_challenges WHERE id = ?3)
		FROM vms LEFT JOIN volumes ON volumes.id = ?1 WHERE vms.name = ?2`
)

// getVMAndVolume reads the VM and the volume, and whether challenge is used
// unless it is nil, in one query.
func (s *SQLite) getVMAndVolume(ctx context.Context, vm, id string, challenge *string) (VM, *Volume, bool, error) {
	var (
		volID, volVM sql.NullString
		sealed, mac  []byte
		erased       sql.NullInt64
		volCreated   sql.NullInt64
		rot          sql.NullInt64
		pending      sql.NullBool
		rotRow       bool
		used         bool
	)
	tail := []any{&volID, &volVM, &sealed, &erased, &volCreated, &mac, &rot, &pending, &rotRow}
	var row rowScanner
	if challenge == nil {
		row = s.queryRow(ctx, sqliteQVMAndVolume, id, vm)
	} else {
		row = s.queryRow(ctx, sqliteQVMAndVolumeUsing, id, vm, *challenge)
		tail = append(tail, &used)
	}
	v, err := scanVM(scanTail{row, tail})
	if isNoRows(err) {
		return VM{}, nil, false, fmt.Errorf("get vm %q: %w (enroll it with `keysvc vm enroll`)", vm, ErrNotFound)
	}
	if err != nil {
		return VM{}, nil, false, fmt.Errorf("get vm %q and volume %q: %w", vm, id, err)
	}
	if !volID.Valid {
		return v, nil, used, nil
	}
	vol := &Volume{ID: volID.String, VM: volVM.String, SealedUK: sealed, MAC: mac, Created: fromNS(volCreated.Int64),
		Rotation: uint64(rot.Int64), RotationPending: pending.Bool, RotationRow: rotRow}
	if len(vol.SealedUK) == 0 {
		vol.SealedUK = nil
	}
	if erased.Valid {
		vol.ErasedAt = fromNS(erased.Int64)
	}
	return v, vol, used, nil
}

// scanTail lets scanVM read the leading columns of a wider row: Scan
// appends the extra destinations.
type scanTail struct {
	r     rowScanner
	extra []any
}

func (t scanTail) Scan(dest ...any) error { return t.r.Scan(append(dest, t.extra...)...) }
