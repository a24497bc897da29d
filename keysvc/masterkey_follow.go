package keysvc

import (
	"context"
	"crypto/subtle"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/keygate/keygate/keysvc/audit"
	"github.com/keygate/keygate/keysvc/masterkey"
	"github.com/keygate/keygate/keysvc/store"
)

// Replicas through a master-key rotation begun at another replica (issue
// 15). The database says what every replica must hold: the rotation row
// names the old and new keys while one is under way, and master_key_check
// the key once it is done. Every replica follows it (followMasterKey, run
// by the database monitor every second, and at once before a row that
// fails its MAC is taken for tampering):
//
//   - a rotation begun elsewhere, to a key this replica can load (the
//     token object NAME.next of a shared HSM, or master.key.next copied
//     into its data directory): it switches online, as the replica that
//     began it did: writes under the new key, reads under either.
//   - a rotation it cannot follow (no new key here): it stops serving
//     rather than raise false tamper alarms or write rows under a key the
//     others are leaving: every request is answered 503 with Retry-After
//     (a VM asks another replica), /readyz says not ready, and the log and
//     the 503's message say what to copy. It resumes by itself once the
//     new key is there.
//   - the rotation finished elsewhere: a replica that followed it installs
//     its copy of the new key and wipes the old one; one that did not stays
//     refused until it is restarted with the new master.key.
//
// The replica that begins a rotation waits followGrace before its first
// batch, so that every replica has either switched or stopped before any
// row moves to the new key (rotateGrace).

// staleKey says why this replica cannot serve under its master key ("" if
// it can).
type staleKey struct {
	mu     sync.Mutex
	reason string
}

func (k *staleKey) get() string {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.reason
}

// set records reason and reports whether it changed.
func (k *staleKey) set(reason string) bool {
	k.mu.Lock()
	defer k.mu.Unlock()
	changed := k.reason != reason
	k.reason = reason
	return changed
}

// followMasterKey brings this replica's keys in line with what the
// database records, and returns why it cannot serve ("" if it can).
func (s *Server) followMasterKey(ctx context.Context) string { return s.followKey(ctx, false) }

// followKey is followMasterKey; full also compares the key the database
// records when nothing suggests a change (a write, on both engines, so the
// once-a-second probe skips it unless a rotation was seen).
func (s *Server) followKey(ctx context.Context, full bool) string {
	if s.rot == nil || s.rot.st == nil || !s.sharedStore() {
		return "" // SQLite: one process owns the store; no other replica rotates
	}
	s.follow.Lock()
	defer s.follow.Unlock()
	reason, err := s.followLocked(ctx, full || s.stale.get() != "")
	if err != nil {
		// The database is away or the key does not load: decided at the
		// next probe; the outage monitor answers for the database.
		s.log.Warn("follow the master key", slog.Any("err", err))
		return s.stale.get()
	}
	if s.stale.set(reason) {
		if reason != "" {
			s.log.Error("this replica stops serving: "+reason, slog.String("key", s.rows.fingerprint()))
		} else {
			s.log.Info("this replica serves again under the master key the database records", slog.String("key", s.rows.fingerprint()))
		}
	}
	return reason
}

func (s *Server) followLocked(ctx context.Context, full bool) (string, error) {
	rot, err := s.rot.st.MasterKeyRotation(ctx)
	if err != nil {
		return "", err
	}
	ks := s.rows.load()
	s.rot.mu.Lock()
	running := s.rot.running
	s.rot.mu.Unlock()
	if rot != nil {
		switch ks.curFP {
		case rot.NewKey:
			return "", nil // began or followed here
		case rot.OldKey:
		default:
			return fmt.Sprintf("the database records a master-key rotation from %s to %s, and this replica holds neither: restart it with the master key of the other replicas", rot.OldKey, rot.NewKey), nil
		}
		next, err := s.rot.src.next(false)
		if errors.Is(err, errNoNext) {
			return fmt.Sprintf("a master-key rotation to key %s was begun at another replica and this replica does not have that key: copy master.key.next from that replica's data directory into this one (picked up within a second), or stop this replica", rot.NewKey), nil
		}
		if err != nil {
			return "", err
		}
		fp, err := masterkey.Fingerprint(next)
		if err != nil || fp != rot.NewKey {
			if d, ok := next.(interface{ Destroy() }); ok {
				d.Destroy()
			}
			if err != nil {
				return "", err
			}
			return fmt.Sprintf("a master-key rotation to key %s was begun at another replica, but the new key here is %s: copy the right master.key.next from that replica", rot.NewKey, fp), nil
		}
		if err := s.rot.lg.Resume(next); err != nil {
			return "", err
		}
		if err := s.resumeKeys(ctx, next, ks.cur); err != nil {
			return "", err
		}
		s.record(ctx, audit.Event{Actor: "keysvc", Action: audit.ActionMasterKeyRotate, Subject: "master-key",
			Details: audit.MasterKeyRotate{Phase: audit.RotateResume, OldKey: rot.OldKey, NewKey: rot.NewKey, Kind: s.rot.src.kind(), VMs: rot.VMs, Volumes: rot.Volumes}})
		s.log.Info("following the master-key rotation begun at another replica", slog.String("old_key", rot.OldKey), slog.String("new_key", rot.NewKey))
		return "", nil
	}
	// No rotation under way: the database's key must be this replica's.
	if ks.prev != nil && !running {
		// Finished at another replica: install our copy, wipe the old key.
		if err := s.rot.src.install(); err != nil {
			return "", err
		}
		s.dropPrevious()
		s.log.Info("master-key rotation finished at another replica; the old key is wiped here", slog.String("key", ks.curFP))
	}
	if !full && ks.prev == nil {
		return "", nil
	}
	fb, ok := s.rot.st.(interface {
		ClaimMasterKey(ctx context.Context, fp []byte) ([]byte, error)
	})
	if !ok {
		return "", nil
	}
	stored, err := fb.ClaimMasterKey(ctx, []byte(ks.curFP))
	if err != nil {
		return "", err
	}
	if subtle.ConstantTimeCompare(stored, []byte(ks.curFP)) != 1 {
		return fmt.Sprintf("the master key was rotated at another replica (the database records %s, this replica holds %s): stop it and restart it with the new master.key of the other replicas", stored, ks.curFP), nil
	}
	return "", nil
}

// keyStale follows the database once more and reports whether this
// replica should answer 503 (staleAnswer) rather than take a row or chain
// that fails its MAC for tampering: it cannot serve under its master key,
// or it has just switched to the rotation's new key (the request read
// under the keys it had; a retry succeeds).
func (s *Server) keyStale(ctx context.Context) bool {
	before := s.rows.fingerprint()
	return s.followKey(ctx, true) != "" || s.rows.fingerprint() != before
}

// staleMessage is staleAnswer's reason after keyStale.
func (s *Server) staleMessage() string {
	if r := s.stale.get(); r != "" {
		return r
	}
	return "this replica has just switched to the new master key of a rotation begun at another replica"
}

// staleReason is why this replica cannot serve ("" if it can), as last
// found.
func (s *Server) staleReason() string { return s.stale.get() }

// DefaultFollowGrace is how long a master-key rotation waits after it
// begins before it re-keys the first row: every replica follows the
// database every second (probeEvery), so by then each has switched to the
// new key or stopped serving.
const DefaultFollowGrace = 3 * probeEvery

// WithFollowGrace sets how long a master-key rotation waits after it
// begins before its first batch (DefaultFollowGrace otherwise; 0 for
// tests with one replica).
func WithFollowGrace(d time.Duration) Option {
	return func(s *Server) { s.followGrace = d; s.followGraceSet = true }
}

// rotationGrace is how long a rotation just begun waits before its first
// batch: WithFollowGrace's, or DefaultFollowGrace on a store that several
// replicas can share (none on SQLite, which one process owns).
func (s *Server) rotationGrace() time.Duration {
	switch {
	case s.followGraceSet:
		return s.followGrace
	case s.sharedStore():
		return DefaultFollowGrace
	}
	return 0
}

// sharedStore reports whether other replicas may use this Server's store
// (anything but SQLite, which one process owns).
func (s *Server) sharedStore() bool {
	raw := any(s.st)
	if a, ok := s.st.(*authStore); ok {
		raw = a.Store
	}
	_, sqlite := raw.(*store.SQLite)
	return !sqlite
}
