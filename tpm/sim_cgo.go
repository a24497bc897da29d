//go:build cgo

package tpm

import (
	"errors"
	"fmt"
	"sync/atomic"

	"github.com/google/go-tpm-tools/simulator"
)

// simInUse guards the go-tpm-tools simulator, a process-wide singleton whose
// Get blocks while another instance is open. Open fails fast instead.
var simInUse atomic.Bool

func openSim() (*TPM, error) {
	if !simInUse.CompareAndSwap(false, true) {
		return nil, errors.New("open simulator: the in-process simulator is already open in this process; Close it first")
	}
	s, err := simulator.Get()
	if err != nil {
		simInUse.Store(false)
		return nil, fmt.Errorf("open simulator: %w", err)
	}
	return &TPM{rw: &simCloser{s}, kind: Simulator, spec: "sim"}, nil
}

// simCloser releases simInUse when the simulator is closed.
type simCloser struct{ *simulator.Simulator }

func (s *simCloser) Close() error {
	err := s.Simulator.Close()
	simInUse.Store(false)
	return err
}
