package keysvc

import (
	"context"
	"crypto/hmac"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"time"

	"github.com/keygate/keygate/attest"
	"github.com/keygate/keygate/keysvc/audit"
	"github.com/keygate/keygate/keysvc/masterkey"
	"github.com/keygate/keygate/keysvc/store"
)

// Adoption and the genesis anchor (issue 12, items 2 and 4).
//
// A store gets its anchor once: on the first start of a keysvc that knows
// row MACs, with the master key, which is trusted at that point. In one
// transaction it MACs every VM and volume row, re-seals every volume's UK
// under ukRecordID (binding it to its owner VM and EK), writes the anchor
// and appends the chain's genesis record. From then on a row without a
// valid MAC is refused, and a store with VMs or volumes but without a
// valid anchor, or with an empty chain, fails `keysvc audit verify`.
//
// Adoption must not become a way to launder rows a database writer
// changed: it is refused if the chain already holds a genesis record (the
// anchor was deleted), if any row already carries a MAC, or if the chain
// does not verify. The remaining gap is a writer who alters a store from
// before row MACs before its first start under this version: adoption
// trusts what is there, as the old version did (docs/operator.md).

// anchorStore is what adoption needs beyond a Store: *store.SQLite.
type anchorStore interface {
	Anchor(ctx context.Context) (*store.Anchor, error)
	Adopt(ctx context.Context, vm func(*store.VM) error, vol func(*store.Volume) error, next store.AuditNext, anchor func(store.AuditRecord) store.Anchor) error
	ListVMs(ctx context.Context) ([]store.VM, error)
	ListVolumes(ctx context.Context, vm string) ([]store.Volume, error)
}

// ErrAnchor is wrapped by adopt's error when the store's anchor is missing
// or forged where it must exist.
var ErrAnchor = errors.New("store anchor missing or invalid")

// adopt checks the store's anchor, or adopts a store that has none.
func adopt(ctx context.Context, st anchorStore, lg *audit.Log, mk MasterKey, now time.Time, log *slog.Logger) error {
	rk, err := mk.Derive(masterkey.LabelRowMAC)
	if err != nil {
		return fmt.Errorf("adopt store: %w", err)
	}
	defer rk.Destroy()
	k := newRowKey(rk)
	a, err := st.Anchor(ctx)
	if err != nil {
		return err
	}
	if a != nil {
		if err := k.checkAnchor(*a); err != nil {
			return err
		}
		return nil
	}
	if _, err := lg.Verify(ctx); err != nil {
		return fmt.Errorf("adopt store: the audit chain must verify before the store's rows are authenticated: %w", err)
	}
	genesis := false
	if err := lg.Scan(ctx, 1, func(r audit.Record) error {
		genesis = genesis || r.Action == audit.ActionGenesis
		return nil
	}); err != nil {
		return err
	}
	if genesis {
		// Another replica may have adopted the store since the anchor was
		// read: its anchor and genesis record commit together, so a second
		// read after seeing the record is conclusive.
		if a, err := st.Anchor(ctx); err != nil {
			return err
		} else if a != nil {
			return k.checkAnchor(*a)
		}
		return fmt.Errorf("%w: the audit chain records an adoption but the store has no anchor (it was deleted); restore the database from a backup", ErrAnchor)
	}
	vms, err := st.ListVMs(ctx)
	if err != nil {
		return err
	}
	vols, err := st.ListVolumes(ctx, "")
	if err != nil {
		return err
	}
	if rep, _ := lg.Verify(ctx); rep.Records == 0 && (len(vms) > 0 || len(vols) > 0) {
		// Every enrollment and volume is recorded before it is stored, so
		// rows with an empty chain mean the chain was wiped: adopting them
		// would authenticate whatever was written meanwhile.
		return fmt.Errorf("%w: the store holds %d VMs and %d volumes but its audit chain is empty (deleted) and it has no anchor; restore the database from a backup", ErrAnchor, len(vms), len(vols))
	}
	// The record is encoded before the transaction runs; the callbacks
	// below refuse any row that is not one of these, MAC-less.
	g := audit.Genesis{VMs: len(vms), Volumes: len(vols), Adopted: len(vms) + len(vols)}
	fps := map[string]string{} // VM name → EK fingerprint (hex)
	seen := 0
	vmFn := func(v *store.VM) error {
		seen++
		if len(v.MAC) != 0 {
			return fmt.Errorf("%w: vm %q carries a MAC but the store has no anchor (it was deleted); restore the database from a backup", ErrAnchor, v.Name)
		}
		ek, err := parsePublicKeyPEM("enrolled EK of vm "+v.Name, v.EKPubPEM)
		if err != nil {
			return err
		}
		fp, err := attest.KeyFingerprint(ek)
		if err != nil {
			return err
		}
		fps[v.Name] = hex.EncodeToString(fp[:])
		v.MAC = k.vmMAC(*v)
		return nil
	}
	volFn := func(v *store.Volume) error {
		seen++
		if seen > g.Adopted {
			return fmt.Errorf("adopt store: rows were added while it was adopted; start again")
		}
		if len(v.MAC) != 0 {
			return fmt.Errorf("%w: volume %q carries a MAC but the store has no anchor (it was deleted); restore the database from a backup", ErrAnchor, v.ID)
		}
		if !v.Erased() {
			// Sealed under the volume ID alone before row MACs.
			uk, err := mk.Open(v.ID, v.SealedUK)
			if err != nil {
				return fmt.Errorf("adopt volume %q: %w", v.ID, err)
			}
			v.SealedUK, err = mk.Seal(ukRecordID(v.ID, v.VM, fps[v.VM]), uk.Bytes())
			uk.Destroy()
			if err != nil {
				return fmt.Errorf("adopt volume %q: %w", v.ID, err)
			}
		}
		v.MAC = k.volumeMAC(*v)
		return nil
	}
	anchor := func(rec store.AuditRecord) store.Anchor {
		a := store.Anchor{Created: time.Unix(0, now.UnixNano()).UTC(), GenesisSeq: rec.Seq, GenesisHash: rec.Hash}
		a.MAC = k.anchorMAC(a)
		return a
	}
	_, err = lg.AppendVia(ctx, audit.Event{Actor: "keysvc", Action: audit.ActionGenesis, Subject: "store", Details: &g},
		func(next store.AuditNext) error { return st.Adopt(ctx, vmFn, volFn, next, anchor) })
	if errors.Is(err, store.ErrExists) {
		return adopt(ctx, st, lg, mk, now, log) // another replica adopted it first
	}
	if err != nil {
		return err
	}
	log.Info("store adopted: rows authenticated under the master key", slog.Int("vms", g.VMs), slog.Int("volumes", g.Volumes), slog.Int("adopted", g.Adopted))
	return nil
}

func (k rowKey) checkAnchor(a store.Anchor) error {
	if len(a.MAC) == 0 || !hmac.Equal(k.anchorMAC(a), a.MAC) {
		return fmt.Errorf("%w: its MAC does not match (forged, or this is not the master key the store was adopted with)", ErrAnchor)
	}
	return nil
}

// verifyStore checks what the audit chain's own check cannot see: the
// anchor, that a used store has a chain, every VM and volume row's MAC,
// and every pending rotation against its volume.
// It returns one line per problem, naming the row.
func (s *Server) verifyStore(ctx context.Context, rep audit.Report) ([]string, error) {
	st, ok := s.st.(*authStore).Store.(anchorStore)
	if !ok {
		return nil, nil
	}
	var out []string
	vms, err := st.ListVMs(ctx)
	if err != nil {
		return nil, err
	}
	vols, err := st.ListVolumes(ctx, "")
	if err != nil {
		return nil, err
	}
	a, err := st.Anchor(ctx)
	if err != nil {
		return nil, err
	}
	used := len(vms) > 0 || len(vols) > 0
	switch {
	case a == nil && used:
		out = append(out, "store: the genesis anchor is missing but the store holds VMs or volumes (deleted; restore the database from a backup)")
	case a != nil:
		if err := s.rows.checkAnchor(*a); err != nil {
			out = append(out, "store: "+err.Error())
			break
		}
		// The genesis record the anchor names must still be in the chain:
		// a chain wiped and begun again does not hold it.
		var found bool
		errStop := errors.New("stop")
		err := s.audit.Scan(ctx, a.GenesisSeq, func(r audit.Record) error {
			found = r.Seq == a.GenesisSeq && r.Action == audit.ActionGenesis && hmac.Equal(r.Hash, a.GenesisHash)
			return errStop
		})
		if err != nil && !errors.Is(err, errStop) {
			return nil, err
		}
		if !found {
			out = append(out, fmt.Sprintf("audit: the genesis record %d that the store's anchor names is not in the chain (the chain was deleted or replaced; restore the database from a backup)", a.GenesisSeq))
		}
	}
	if used && rep.Records == 0 {
		out = append(out, "audit: the chain is empty but the store holds VMs or volumes (the whole chain was deleted; restore the database from a backup)")
	}
	for _, v := range vms {
		if err := s.rows.checkVM(v); err != nil {
			out = append(out, err.Error())
		}
	}
	for _, v := range vols {
		if err := s.rows.checkVolume(v); err != nil {
			out = append(out, err.Error())
		}
	}
	rot, err := s.verifyRotations(ctx, vols)
	return append(out, rot...), err
}

// tampered raises a row that failed its integrity check: a critical event
// (stored like a VM's, so the dashboard and GET /v1/admin/events show it),
// an audit record naming the row, and an error log line.
//
// vm and volume are those the request named (for the event's columns).
func (s *Server) tampered(r *http.Request, vm, volume string, err error) {
	var te *TamperError
	if !errors.As(err, &te) {
		te = &TamperError{Kind: "record", Detail: err.Error()}
	}
	remote := remoteHost(r)
	s.log.Error("stored record fails its integrity check; nothing released", slog.String("kind", te.Kind),
		slog.String("name", te.Name), slog.String("detail", te.Detail), slog.String("remote", remote))
	if !s.budget(remote) {
		return // counted in the source's summary (refuse)
	}
	data, _ := json.Marshal(map[string]string{"kind": "store-tampered", "severity": "critical", "record": te.Kind, "name": te.Name, "detail": te.Detail})
	ev := store.VMEvent{Received: s.now(), VM: capName(vm), Volume: capName(volume), Kind: "store-tampered", Severity: "critical", Data: data}
	if _, err := s.st.AddEvents(r.Context(), []store.VMEvent{ev}); err != nil {
		s.log.Error("store critical event failed", slog.Any("err", err))
	}
	s.metrics.events.WithLabelValues("critical", "other").Inc()
	s.record(r.Context(), audit.Event{Actor: "keysvc", Action: audit.ActionTamper, Subject: te.Kind + ":" + te.Name,
		Details: audit.Tamper{Kind: te.Kind, Name: te.Name, Detail: te.Detail, Remote: remote}})
}
