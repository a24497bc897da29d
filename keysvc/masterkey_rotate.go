package keysvc

import (
	"context"
	"crypto"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"sync"
	"time"

	"github.com/keygate/keygate/attest"
	"github.com/keygate/keygate/keysvc/api"
	"github.com/keygate/keygate/keysvc/audit"
	"github.com/keygate/keygate/keysvc/masterkey"
	"github.com/keygate/keygate/keysvc/store"
)

// Master-key rotation (issue 15): `keysvc master-key rotate`, POST
// /v1/admin/master-key/rotate. Online, in batches, crash-safe:
//
//  1. The new key is made and kept where the old one is (master.key.next,
//     or the token object NAME.next), before anything refers to it.
//  2. Begin, in one store transaction: the rotation row (old and new key
//     fingerprints, empty cursors), the store anchor re-MAC'd under the
//     new key, and the audit chain's switch record (audit/keyswitch.go),
//     MAC'd under the new key. From here on the Server writes under the
//     new key and reads under either (keyring.go).
//  3. Batches of rows, each one transaction: a row is checked under
//     either key (a tampered row stops the rotation, it is never
//     laundered), its UK opened and re-sealed, its MAC recomputed under
//     the new key, and the cursor advanced.
//  4. Install: the new key replaces the old one (file renamed over it and
//     the old file overwritten; on a token the old object destroyed and
//     the new one relabelled).
//  5. Finish, in one transaction: the rotation row deleted and a
//     `master-key-rotate` finish record appended. The old key is then
//     wiped from memory.
//
// A service that stops anywhere resumes on its next start: it finds the
// rotation row, loads the keys it names, and carries on from the cursors
// (or, if the new key is installed already, only finishes).
//
// Sub-keys: the row MAC key, the records key and the audit MAC key move
// with the master key. The challenge MAC key moves too, but a challenge
// issued under the old one still redeems for its TTL (so an unlock in
// flight across the switch does not fail); the old challenge key is
// wiped when that has passed after the finish. The session MAC key does
// not move: it is sealed in the store and re-sealed here like the UKs, so
// that sessions issued before the rotation stay valid after it and after a
// restart (sessionkey.go says why it is kept rather than replaced).

// DefaultRotateBatch is how many rows one rotation batch re-keys.
const DefaultRotateBatch = 100

// challengers are the Server's challenge issuer and, after a rotation,
// the one under the previous key, which still checks tokens until
// prevUntil (zero: while the rotation runs).
type challengers struct {
	cur, prev *attest.Challenger
	prevUntil time.Time
}

// checkChallenge checks a token under the current challenge key and, for
// a token made under the previous one, under that.
func (s *Server) checkChallenge(token, vm, volume string, ek, ak crypto.PublicKey) (attest.Claims, error) {
	cs := s.chs.Load()
	claims, err := cs.cur.Check(token, vm, volume, ek, ak, s.now())
	if errors.Is(err, attest.ErrChallengeMAC) && cs.prev != nil && (cs.prevUntil.IsZero() || s.now().Before(cs.prevUntil)) {
		return cs.prev.Check(token, vm, volume, ek, ak, s.now())
	}
	return claims, err
}

// sessionKeys are the session MAC key and, after a rotation, the previous
// one, which still checks the sessions made under it.
type sessionKeys struct{ cur, prev []byte }

func (s *Server) sessionMACOK(payload, m []byte) bool {
	ks := s.sess.Load()
	if hmac.Equal(m, s.mac(payload)) {
		return true
	}
	if ks.prev == nil {
		return false
	}
	h := hmac.New(sha256.New, ks.prev)
	h.Write(payload)
	return hmac.Equal(m, h.Sum(nil))
}

func (s *Server) wipeSessionKeys() {
	ks := s.sess.Load()
	clear(ks.cur)
	clear(ks.prev)
}

// rotator is what the Server needs to rotate its master key: where keys
// live, the store's rotation state and the audit chain. A Service sets it.
type rotator struct {
	src   keySource
	st    rotationStore
	lg    *audit.Log
	batch int
	// hook, if set, runs before each batch (1, 2, …); an error stops the
	// rotation there, as a crash would (tests).
	hook func(batch int) error
	// ctx ends a running rotation when the Service stops.
	ctx    context.Context
	cancel context.CancelFunc

	// begin serialises rotate calls, so that two at once make one new key.
	begin sync.Mutex

	// graceUntil: the first batch waits for it (masterkey_follow.go).
	graceUntil time.Time

	mu      sync.Mutex
	running bool
	lastErr error
	done    chan struct{} // closed when the running rotation stops
}

// rotationStore is what rotation needs of the store.
type rotationStore interface {
	store.MasterKeyRotations
	GetVM(ctx context.Context, name string) (store.VM, error)
}

// WithRotateBatch sets how many rows a master-key rotation batch re-keys
// (DefaultRotateBatch otherwise).
func WithRotateBatch(n int) Option { return func(s *Server) { s.rotBatch = n } }

// HookInstalled is the batch number WithRotateHook's hook is given after
// the new key is installed and before the rotation is finished.
const HookInstalled = 0

// WithRotateHook runs hook before each master-key rotation batch (1, 2, …)
// and once more after the new key is installed (HookInstalled); an error
// stops the rotation there as a crash would. For fault-injection tests.
func WithRotateHook(hook func(batch int) error) Option {
	return func(s *Server) { s.rotHook = hook }
}

func (s *Server) masterKeyInfo(ctx context.Context) (api.MasterKeyInfo, error) {
	info := api.MasterKeyInfo{Fingerprint: s.rows.fingerprint(), Kind: s.rot.src.kind()}
	r, err := s.rot.st.MasterKeyRotation(ctx)
	if err != nil {
		return info, err
	}
	if r != nil {
		s.rot.mu.Lock()
		ri := &api.RotationInfo{OldKey: r.OldKey, NewKey: r.NewKey, Started: r.Started, VMs: r.VMs, Volumes: r.Volumes, Running: s.rot.running}
		if s.rot.lastErr != nil {
			ri.Error = s.rot.lastErr.Error()
		}
		s.rot.mu.Unlock()
		info.Rotation = ri
	}
	return info, nil
}

func (s *Server) adminMasterKey(w http.ResponseWriter, r *http.Request) {
	if s.rot == nil {
		writeError(w, errorf(http.StatusNotImplemented, "run keysvc serve", "this key service has no master-key management"))
		return
	}
	info, err := s.masterKeyInfo(r.Context())
	if err != nil {
		s.internal(w, "read master-key rotation", err)
		return
	}
	writeJSON(w, http.StatusOK, info)
}

// adminRotateMasterKey starts a rotation, or resumes one that stopped,
// and answers 202 with its state; the rotation runs in the background
// (GET /v1/admin/master-key follows it).
func (s *Server) adminRotateMasterKey(w http.ResponseWriter, r *http.Request) {
	if s.rot == nil {
		writeError(w, errorf(http.StatusNotImplemented, "run keysvc serve", "this key service has no master-key management"))
		return
	}
	ctx := r.Context()
	s.rot.begin.Lock()
	defer s.rot.begin.Unlock()
	cur, err := s.rot.st.MasterKeyRotation(ctx)
	if err != nil {
		s.internal(w, "read master-key rotation", err)
		return
	}
	if cur == nil {
		if err := s.beginRotation(ctx); err != nil {
			writeError(w, errorf(http.StatusInternalServerError, "nothing was rotated; fix the cause and run `keysvc master-key rotate` again", "begin master-key rotation: %v", err))
			return
		}
	}
	s.startRotation()
	info, err := s.masterKeyInfo(ctx)
	if err != nil {
		s.internal(w, "read master-key rotation", err)
		return
	}
	writeJSON(w, http.StatusAccepted, info)
}

// beginRotation makes the new key and records the rotation (steps 1, 2).
func (s *Server) beginRotation(ctx context.Context) error {
	next, err := s.rot.src.next(true)
	if err != nil {
		return fmt.Errorf("make the new master key: %w", err)
	}
	ks := s.rows.load()
	nk, err := newRingKeys(next)
	if err != nil {
		return err
	}
	if nk.curFP == ks.curFP {
		nk.rows.key.Destroy()
		return errors.New("the new master key is the current one")
	}
	nk.prev, nk.prevRows = ks.cur, &ks.rows
	ev := audit.Event{Actor: "admin", Action: audit.ActionMasterKeyRotate, Subject: "master-key",
		Details: audit.MasterKeyRotate{Phase: audit.RotateBegin, OldKey: ks.curFP, NewKey: nk.curFP, Kind: s.rot.src.kind()}}
	rot := store.MasterKeyRotation{OldKey: ks.curFP, NewKey: nk.curFP, Started: time.Unix(0, s.now().UnixNano()).UTC()}
	anchor := func(a store.Anchor) store.Anchor { a.MAC = nk.rows.anchorMAC(a); return a }
	_, err = s.rot.lg.AppendSwitch(ctx, ev, next, func(n store.AuditNext) error { return s.rot.st.BeginMasterKeyRotation(ctx, rot, anchor, n) })
	if err != nil {
		nk.rows.key.Destroy()
		return err
	}
	if err := s.switchKeys(nk); err != nil {
		return err
	}
	s.rot.graceUntil = s.now().Add(s.rotationGrace())
	s.log.Info("master-key rotation begun", slog.String("old_key", ks.curFP), slog.String("new_key", nk.curFP), slog.String("kind", s.rot.src.kind()))
	return nil
}

// switchKeys makes nk (with its previous key) the Server's keys: rows,
// challenges and sessions.
func (s *Server) switchKeys(nk *ringKeys) error {
	chKey, err := nk.cur.Derive(masterkey.LabelChallengeMAC)
	if err != nil {
		return err
	}
	ch, err := attest.NewChallenger(chKey.Bytes(), attest.WithTTL(s.ttl), attest.WithClock(s.now))
	chKey.Destroy()
	if err != nil {
		return err
	}
	s.rows.p.Store(nk)
	s.chs.Store(&challengers{cur: ch, prev: s.chs.Load().cur})
	if s.sessStored {
		return nil // the stored session key stays (sessionkey.go); rekeyServiceKeys re-seals it
	}
	sk, err := nk.cur.Derive(labelSessionMAC)
	if err != nil {
		return err
	}
	s.sess.Store(&sessionKeys{cur: append([]byte(nil), sk.Bytes()...), prev: s.sess.Load().cur})
	sk.Destroy()
	return nil
}

// resumeKeys sets up a Server started in the middle of a rotation: prev
// is the old master key (nil if the new one is installed already).
func (s *Server) resumeKeys(ctx context.Context, next, prev MasterKey) error {
	nk, err := newRingKeys(next)
	if err != nil {
		return err
	}
	if prev != nil {
		nk.prev = prev
		old := s.rows.load()
		nk.prevRows = &old.rows
	}
	return s.switchKeys(nk)
}

// startRotation runs the batches and the finish in the background, unless
// they run already.
func (s *Server) startRotation() {
	s.rot.mu.Lock()
	defer s.rot.mu.Unlock()
	if s.rot.running {
		return
	}
	s.rot.running, s.rot.lastErr = true, nil
	s.rot.done = make(chan struct{})
	go func() {
		err := s.runRotation(s.rot.ctx)
		s.rot.mu.Lock()
		s.rot.running, s.rot.lastErr = false, err
		close(s.rot.done)
		s.rot.mu.Unlock()
		if err != nil {
			s.log.Error("master-key rotation stopped; run `keysvc master-key rotate` again, or restart keysvc, to resume it", slog.Any("err", err))
		}
	}()
}

// waitRotation waits for a running rotation to stop and returns why it did
// (nil: it finished).
func (s *Server) waitRotation() error {
	s.rot.mu.Lock()
	done := s.rot.done
	s.rot.mu.Unlock()
	if done != nil {
		<-done
	}
	s.rot.mu.Lock()
	defer s.rot.mu.Unlock()
	return s.rot.lastErr
}

// runRotation re-keys the remaining rows, installs the new key and
// finishes (steps 3 to 5).
func (s *Server) runRotation(ctx context.Context) error {
	ks := s.rows.load()
	if ks.prev != nil {
		eks := map[string]string{} // VM name → EK fingerprint, hex
		ekFP := func(name string) (string, error) {
			if fp, ok := eks[name]; ok {
				return fp, nil
			}
			vm, err := s.rot.st.GetVM(ctx, name)
			if err != nil {
				return "", err
			}
			pub, err := parsePublicKeyPEM("enrolled EK of vm "+name, vm.EKPubPEM)
			if err != nil {
				return "", err
			}
			fp, err := attest.KeyFingerprint(pub)
			if err != nil {
				return "", err
			}
			eks[name] = hex.EncodeToString(fp[:])
			return eks[name], nil
		}
		vmFn := func(v *store.VM) error {
			if err := s.rows.checkVM(*v); err != nil {
				return fmt.Errorf("rekey: %w", err)
			}
			v.MAC = ks.rows.vmMAC(*v)
			return nil
		}
		volFn := func(v *store.Volume) error {
			if err := s.rows.checkVolume(*v); err != nil {
				return fmt.Errorf("rekey: %w", err)
			}
			if !v.Erased() {
				fp, err := ekFP(v.VM)
				if err != nil {
					return fmt.Errorf("rekey volume %q: %w", v.ID, err)
				}
				id := ukRecordID(v.ID, v.VM, fp)
				uk, done, err := s.openUK(id, v.SealedUK)
				if err != nil {
					return fmt.Errorf("rekey volume %q: %w", v.ID, err)
				}
				v.SealedUK, err = ks.cur.Seal(id, uk)
				done()
				if err != nil {
					return fmt.Errorf("rekey volume %q: %w", v.ID, err)
				}
			}
			v.MAC = ks.rows.volumeMAC(*v)
			return nil
		}
		// Let the other replicas switch to the new key, or stop, before
		// any row moves to it (masterkey_follow.go).
		if wait := s.rot.graceUntil.Sub(s.now()); wait > 0 {
			s.log.Info("master-key rotation: waiting for the other replicas to follow", slog.Duration("wait", wait))
			select {
			case <-ctx.Done():
				return ctx.Err()
			case <-time.After(wait):
			}
		}
		// First the stored session key (sessionkey.go): one row, and then
		// any replica holding the new key alone opens it.
		if err := s.rekeyServiceKeys(ctx, ks); err != nil {
			return err
		}
		for batch := 1; ; batch++ {
			if s.rot.hook != nil {
				if err := s.rot.hook(batch); err != nil {
					return err
				}
			}
			r, done, err := s.rot.st.RekeyBatch(ctx, s.rot.batch, vmFn, volFn)
			if err != nil {
				return err
			}
			s.metrics.rotationRows.Set(float64(r.VMs + r.Volumes))
			s.log.Info("master-key rotation batch", slog.Int("batch", batch), slog.Int("vms", r.VMs), slog.Int("volumes", r.Volumes))
			if done {
				break
			}
		}
		// The pending unwrap keys of volume rotations (rotate.go).
		if err := s.rekeyPendingUKs(ctx, ks, ekFP); err != nil {
			return err
		}
	}
	r, err := s.rot.st.MasterKeyRotation(ctx)
	if err != nil {
		return err
	}
	if r == nil {
		return errors.New("the rotation row disappeared")
	}
	if err := s.rot.src.install(); err != nil {
		return err
	}
	if s.rot.hook != nil {
		if err := s.rot.hook(HookInstalled); err != nil {
			return err
		}
	}
	ev := audit.Event{Actor: "keysvc", Action: audit.ActionMasterKeyRotate, Subject: "master-key",
		Details: audit.MasterKeyRotate{Phase: audit.RotateFinish, OldKey: r.OldKey, NewKey: r.NewKey, Kind: s.rot.src.kind(), VMs: r.VMs, Volumes: r.Volumes}}
	if _, err := s.rot.lg.AppendVia(ctx, ev, func(n store.AuditNext) error { return s.rot.st.FinishMasterKeyRotation(ctx, n) }); err != nil {
		return err
	}
	s.dropPrevious()
	s.metrics.rotationRows.Set(0)
	s.log.Info("master-key rotation finished; the old key is wiped", slog.String("key", r.NewKey), slog.Int("vms", r.VMs), slog.Int("volumes", r.Volumes))
	return nil
}

// dropPrevious wipes the old key's row MAC key, audit key and session key
// and the old master key, and keeps the old challenge key for one TTL.
func (s *Server) dropPrevious() {
	ks := s.rows.load()
	if ks.prev == nil {
		return
	}
	s.rows.p.Store(&ringKeys{cur: ks.cur, curFP: ks.curFP, rows: ks.rows})
	ks.prevRows.key.Destroy()
	if d, ok := ks.prev.(interface{ Destroy() }); ok {
		d.Destroy()
	}
	s.rot.lg.DropPrevious()
	cs := s.chs.Load()
	s.chs.Store(&challengers{cur: cs.cur, prev: cs.prev, prevUntil: s.now().Add(s.ttl)})
}
