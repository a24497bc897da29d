package keysvc

import (
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"net/http"
	"strings"

	"github.com/keygate/keygate/keysvc/api"
	"github.com/keygate/keygate/keysvc/store"
)

// A session token is "s1." || base64url(payload) || "." ||
// base64url(HMAC-SHA256(K_session, payload)), with payload the JSON
// {"vm","volume","id","iat"}, and K_session the key sealed in the store
// (sessionkey.go), which master-key rotations keep. The token is checked
// without state, so any replica checks it; the session's state is read from
// the VM and volume records (a revoked VM or an erased volume makes it
// "revoked") and from the re-attestation state (a lock makes it "revoked").
type sessionClaims struct {
	VM     string `json:"vm"`
	Volume string `json:"volume"`
	ID     string `json:"id"`  // random, hex; the name audit records use
	IAT    int64  `json:"iat"` // Unix seconds
}

const sessionPrefix = "s1."

func (s *Server) newSession(vm, volume string) (token, id string) {
	var rnd [16]byte
	rand.Read(rnd[:])
	id = hex.EncodeToString(rnd[:])
	payload, _ := json.Marshal(sessionClaims{VM: vm, Volume: volume, ID: id, IAT: s.now().Unix()})
	enc := base64.RawURLEncoding
	return sessionPrefix + enc.EncodeToString(payload) + "." + enc.EncodeToString(s.mac(payload)), id
}

var errBadSession = errors.New("session token invalid")

func (s *Server) parseSession(token string) (sessionClaims, error) {
	var c sessionClaims
	rest, ok := strings.CutPrefix(token, sessionPrefix)
	if !ok || len(token) > 2048 {
		return c, errBadSession
	}
	p, m, ok := strings.Cut(rest, ".")
	enc := base64.RawURLEncoding.Strict()
	payload, err1 := enc.DecodeString(p)
	mac, err2 := enc.DecodeString(m)
	if !ok || err1 != nil || err2 != nil || !s.sessionMACOK(payload, mac) {
		return c, errBadSession
	}
	if err := json.Unmarshal(payload, &c); err != nil {
		return c, errBadSession
	}
	return c, nil
}

// sessionState reads whether the session is still active.
func (s *Server) sessionState(r *http.Request, c sessionClaims) (string, error) {
	vm, err := s.st.GetVM(r.Context(), c.VM)
	if errors.Is(err, store.ErrNotFound) {
		return api.StateRevoked, nil
	}
	if errors.Is(err, ErrTampered) {
		// Fail closed: the VM wipes its keys, as for a deleted row.
		s.tampered(r, c.VM, c.Volume, err)
		return api.StateRevoked, nil
	}
	if err != nil {
		return "", err
	}
	vol, err := s.st.GetVolume(r.Context(), c.Volume)
	if errors.Is(err, store.ErrNotFound) {
		return api.StateRevoked, nil
	}
	if errors.Is(err, ErrTampered) {
		s.tampered(r, c.VM, c.Volume, err)
		return api.StateRevoked, nil
	}
	if err != nil {
		return "", err
	}
	if vm.Revoked || vol.Erased() {
		return api.StateRevoked, nil
	}
	if locked, err := s.isLocked(r.Context(), c); err != nil || locked {
		return api.StateRevoked, err
	}
	return api.StateActive, nil
}

func badSession(w http.ResponseWriter) {
	w.Header().Set("WWW-Authenticate", `Bearer realm="keysvc session"`)
	writeError(w, errorf(http.StatusUnauthorized, "send the session token POST /v1/unlock returned", "session token invalid"))
}

func (s *Server) handleSession(w http.ResponseWriter, r *http.Request) {
	tok, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
	if !ok {
		badSession(w)
		return
	}
	c, err := s.parseSession(strings.TrimSpace(tok))
	if err != nil {
		badSession(w)
		return
	}
	state, err := s.sessionState(r, c)
	if err != nil {
		s.internal(w, "read session state", err)
		return
	}
	writeJSON(w, http.StatusOK, api.SessionResponse{State: state})
}
