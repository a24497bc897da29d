package keysvc

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"strconv"

	"github.com/keygate/keygate/keysvc/audit"
	"github.com/keygate/keygate/keysvc/store"
)

// The changes the admin API and the dashboard both make. Each appends its
// action record before it changes anything, fail-closed (as intend), and
// names its actor: "admin" for the token, the session for the dashboard.

// errNotRecorded means the action record could not be appended, so nothing
// was changed; a *notRecorded wraps it.
var errNotRecorded = errors.New("cannot record the change in the audit chain; nothing was changed")

type notRecorded struct{ action, subject string }

func (e *notRecorded) Error() string {
	return fmt.Sprintf("cannot record %s %q in the audit chain; nothing was changed", e.action, e.subject)
}
func (e *notRecorded) Unwrap() error { return errNotRecorded }

func (s *Server) intendAs(ctx context.Context, ev audit.Event) error {
	if _, err := s.audit.Append(context.WithoutCancel(ctx), ev); err != nil {
		s.log.Error("audit append failed; change refused", slog.String("action", string(ev.Action)),
			slog.String("subject", ev.Subject), slog.String("actor", ev.Actor), slog.Any("err", err))
		return &notRecorded{string(ev.Action), ev.Subject}
	}
	return nil
}

// changeError answers a failed change.
func (s *Server) changeError(w http.ResponseWriter, what string, err error) {
	var nr *notRecorded
	if errors.As(err, &nr) {
		writeError(w, errorf(http.StatusInternalServerError, "nothing was changed; run `keysvc audit verify` and repair the audit chain",
			"cannot record %s %q in the audit chain", nr.action, nr.subject))
		return
	}
	s.storeError(w, what, err)
}

func (s *Server) revokeVM(ctx context.Context, actor, name string) (store.VM, error) {
	// VMs are never deleted, so one read first means no record is written
	// for a VM that does not exist.
	if _, err := s.st.GetVM(ctx, name); err != nil {
		return store.VM{}, err
	}
	if err := s.intendAs(ctx, audit.Event{Actor: actor, Action: audit.ActionRevoke, Subject: name, Details: audit.Revoke{}}); err != nil {
		return store.VM{}, err
	}
	return s.st.UpdateVM(ctx, name, func(v *store.VM) error { v.Revoked = true; return nil })
}

func (s *Server) armLearn(ctx context.Context, actor, name string) (store.VM, error) {
	if _, err := s.st.GetVM(ctx, name); err != nil {
		return store.VM{}, err
	}
	if err := s.intendAs(ctx, audit.Event{Actor: actor, Action: audit.ActionLearn, Subject: name, Details: audit.Learn{Armed: true}}); err != nil {
		return store.VM{}, err
	}
	return s.st.UpdateVM(ctx, name, func(v *store.VM) error { v.LearnArmed = true; return nil })
}

func (s *Server) eraseVolume(ctx context.Context, actor, id string) (store.Volume, error) {
	if _, err := s.st.GetVolume(ctx, id); err != nil {
		return store.Volume{}, err
	}
	if err := s.intendAs(ctx, audit.Event{Actor: actor, Action: audit.ActionErase, Subject: id, Details: audit.Erase{Volume: id}}); err != nil {
		return store.Volume{}, err
	}
	return s.st.UpdateVolume(ctx, id, func(v *store.Volume) error { v.SealedUK = nil; return nil })
}

func (s *Server) adminRevoke(w http.ResponseWriter, r *http.Request) {
	name := r.PathValue("name")
	vm, err := s.revokeVM(r.Context(), "admin", name)
	if err != nil {
		s.changeError(w, "revoke vm "+strconv.Quote(name), err)
		return
	}
	writeJSON(w, http.StatusOK, vmInfo(vm))
}

func (s *Server) adminLearn(w http.ResponseWriter, r *http.Request) {
	name := r.PathValue("name")
	vm, err := s.armLearn(r.Context(), "admin", name)
	if err != nil {
		s.changeError(w, "arm learn mode of vm "+strconv.Quote(name), err)
		return
	}
	writeJSON(w, http.StatusOK, vmInfo(vm))
}

func (s *Server) adminErase(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	vol, err := s.eraseVolume(r.Context(), "admin", id)
	if err != nil {
		s.changeError(w, "erase volume "+strconv.Quote(id), err)
		return
	}
	writeJSON(w, http.StatusOK, volumeInfo(vol))
}
